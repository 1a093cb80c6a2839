"""HTTP API under load: stored-feed reads and on-demand lists, the load generator in its own
process, against a real API (uvicorn), redis-server and broker on this machine.

The live models (``STREAMREC_LIVE_MODELS``) learn ``20 × --users`` simulated events, so lists
draw on their candidates as in production (item vectors reach the API's index only through the
item-vector topic, which no worker feeds here: no ANN candidates). Feeds are built for
``--users`` simulated users, then for ``--seconds`` each a load process
(raw HTTP/1.1 keep-alive on uvloop) runs three phases: ``GET /v1/users/<u>/feed`` closed loop
(``--concurrency`` requests always in flight: the most it serves, latency = concurrency /
throughput), the same open loop at ``--feed-rate`` requests/s (latency from when each was due),
and ``GET /v1/users/<u>/recommendations`` closed loop, then open loop at ``--on-demand-rate``.
Each phase also reports the API's (all its processes), Redis's and the feed builder's CPU
milliseconds per request: what a process with a core of its own could serve. The feed builder
role runs beside the API, as deployed, publishing the item neighbourhoods the API reads
(``serving/neighbour_rows.py``); ``--neighbourhoods counted`` leaves it out and each API
process counts its own, as before. Baseline in the same run: one client
doing the feed read's Redis GET directly, one at a time. On-demand phases also report the API's
own view from its /metrics (``serving/metrics.py``): ``server_p50/p99`` (asked → answered inside
the API, bucket-interpolated), each stage's p99, a compute pass's wall and CPU p50/p99, and lists
per pass; what the client measures beyond it is the network and the load generator's own core,
shared with Redis and the broker. Usage:
``python bench/api.py [--workers 1] [--concurrency 50] [--feed-rate 5000]
[--on-demand-rate 1000] [--phases floor,feed,feed_open,on_demand,on_demand_open]``. Last
line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.report import cpu_seconds, print_result, simulated_serving_state  # noqa: E402
from infra.embedded import (EmbeddedKafka, EmbeddedRedis, ensure_streamrec_topics,  # noqa: E402
                            free_port, terminate)
from infra.redis_client import sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402


#: Authenticated callers are not rate-limited (anonymous on-demand lists are).
BENCH_KEY = "bench-api-key-0000000001"


def load(url: str, users: list[str], path: str, seconds: float, concurrency: int,
         rate: float, out) -> None:
    """In a process of its own, for ``seconds``, over ``concurrency`` keep-alive connections:
    closed loop (``rate`` 0: each connection sends its next request when the last answer is
    in) or open loop (requests due at ``rate`` per second, taken by the next free connection;
    latency counts from when a request was due, so queueing is not hidden). HTTP/1.1 written
    and read on asyncio streams (uvloop): the generator must cost far less than the server."""
    import urllib.parse

    import uvloop

    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    requests = [(f"GET {path.format(user=urllib.parse.quote(user, safe=''))} HTTP/1.1\r\n"
                 f"Host: {host}\r\nX-API-Key: {BENCH_KEY}\r\n\r\n").encode() for user in users]

    async def main():
        latencies, errors = [], 0
        deadline = time.perf_counter() + seconds

        due: asyncio.Queue = asyncio.Queue()

        async def schedule():
            n, started = 0, time.perf_counter()
            while time.perf_counter() < deadline:
                while n < (time.perf_counter() - started) * rate:
                    due.put_nowait(started + n / rate)
                    n += 1
                await asyncio.sleep(0.0005)
            for _ in range(concurrency):
                due.put_nowait(None)

        async def connection(n: int):
            nonlocal errors
            reader, writer = await asyncio.open_connection(host, port)
            k = n
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                if rate:
                    start = await due.get()
                    if start is None:
                        break
                writer.write(requests[k % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                errors += head[9:12] != b"200"
                k += concurrency
            writer.close()
        started = time.perf_counter()
        await asyncio.gather(*(connection(n) for n in range(concurrency)),
                             *([schedule()] if rate else []))
        return latencies, errors, time.perf_counter() - started

    latencies, errors, elapsed = uvloop.run(main())
    out.send((latencies, errors, elapsed))


def redis_floor(redis_url: str, keys: list[str], seconds: float, out) -> None:
    client = sync_redis(redis_url)
    latencies, deadline, n = [], time.perf_counter() + seconds, 0
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        client.get(keys[n % len(keys)])
        latencies.append(time.perf_counter() - start)
        n += 1
    out.send((latencies, 0, time.perf_counter() - started))


def in_process(target, *args):
    receive, send = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.Process(target=target, args=(*args, send))
    proc.start()
    result = receive.recv()
    proc.join()
    return result


def figures(name: str, result, cpu_ms: dict[str, float] | None = None) -> dict:
    """Throughput, p50/p99 and errors; ``cpu_ms``: CPU milliseconds each process spent in the
    phase (API, Redis), reported per request."""
    latencies, errors, elapsed = result
    ms = np.array(latencies) * 1000
    out = {f"{name}_rps": round(len(ms) / elapsed), f"{name}_p50_ms": round(float(
        np.percentile(ms, 50)), 2), f"{name}_p99_ms": round(float(np.percentile(ms, 99)), 2),
        f"{name}_errors": errors}
    for process, spent in (cpu_ms or {}).items():
        out[f"{name}_{process}_cpu_ms_per_request"] = round(spent / max(len(ms), 1), 3)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants (API worker processes), Linux /proc."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_cpu_seconds(int(child))
    return total


def on_demand_buckets(metrics_url: str) -> dict[str, dict[float, float]]:
    """The API's ``streamrec_on_demand_seconds`` histogram: stage → {upper bound: count}
    (cumulative), and ``pass_lists`` → {"count", "sum"} of lists per pass."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[float, float]] = {"pass_lists": {}}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        for sample in family.samples:
            if sample.name == "streamrec_on_demand_seconds_bucket":
                out.setdefault(sample.labels["stage"], {})[float(sample.labels["le"])] = \
                    sample.value
            elif sample.name == "streamrec_on_demand_pass_seconds_bucket":
                out.setdefault(f"pass_{sample.labels['clock']}", {})[
                    float(sample.labels["le"])] = sample.value
            elif sample.name in ("streamrec_on_demand_pass_lists_count",
                                 "streamrec_on_demand_pass_lists_sum"):
                out["pass_lists"][sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def bucket_quantile(q: float, cumulative: dict[float, float]) -> float:
    """The ``q`` quantile of a histogram's cumulative bucket counts, interpolated within its
    bucket as Prometheus's ``histogram_quantile`` does (seconds)."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if not total:
        return float("nan")
    below, lower = 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= q * total:
            if bound == float("inf"):
                return lower  # past the last finite bound: its value, as Prometheus says
            return lower + (bound - lower) * (q * total - below) / (cumulative[bound] - below)
        below, lower = cumulative[bound], bound
    return lower


def server_figures(name: str, before: dict, after: dict) -> dict:
    """The API's own view of a phase's on-demand lists: p50/p99 of their time in the API
    (asked → answered), p99 of each stage, of a pass's wall and CPU time, and lists per
    compute pass."""
    out = {}
    for stage in ("total", "queued", "computed", "logged", "pass_wall", "pass_cpu"):
        delta = {bound: count - before.get(stage, {}).get(bound, 0.0)
                 for bound, count in after.get(stage, {}).items()}
        if not delta:
            continue
        quantiles = (0.99,) if stage in ("queued", "computed", "logged") else (0.5, 0.99)
        for q in quantiles:
            label = "server" if stage == "total" else f"server_{stage}"
            out[f"{name}_{label}_p{round(q * 100)}_ms"] = round(
                1000 * bucket_quantile(q, delta), 2)
    passes = after["pass_lists"].get("count", 0.0) - before["pass_lists"].get("count", 0.0)
    if passes:
        out[f"{name}_lists_per_pass"] = round(
            (after["pass_lists"]["sum"] - before["pass_lists"].get("sum", 0.0)) / passes, 1)
    return out


def phase(name: str, pids: dict[str, int], metrics_url: str | None, target, *args) -> dict:
    """One load phase's figures, with each process's CPU per request (``pids``: name → pid;
    the API's with its worker processes) and, from ``metrics_url`` (the API's /metrics), the
    API's own latency figures for on-demand lists."""
    before = {process: tree_cpu_seconds(pid) for process, pid in pids.items()}
    buckets = on_demand_buckets(metrics_url) if metrics_url else None
    result = in_process(target, *args)
    spent = {process: 1000 * (tree_cpu_seconds(pid) - before[process])
             for process, pid in pids.items()}
    out = figures(name, result, spent)
    if buckets is not None:
        out.update(server_figures(name, buckets, on_demand_buckets(metrics_url)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="API processes")
    parser.add_argument("--pin", action="store_true",
                        help="API process on a core of its own (one worker), the rest elsewhere")
    parser.add_argument("--feed-rate", type=float, default=5000.0,
                        help="requests/s offered in the open-loop stored-feed phase")
    parser.add_argument("--on-demand-rate", type=float, default=1000.0,
                        help="requests/s offered in the open-loop on-demand phase")
    parser.add_argument("--neighbourhoods", choices=("published", "counted"),
                        default="published", help="published: the feed builder role runs "
                        "beside the API (off the API's core with --pin) and publishes item "
                        "neighbourhoods, as deployed; counted: each API process counts its own")
    parser.add_argument("--phases", default="floor,feed,feed_open,on_demand,on_demand_open",
                        help="which phases to run, comma-separated, in their usual order")
    args = parser.parse_args()
    chosen = set(args.phases.split(","))
    unknown = chosen - {"floor", "feed", "feed_open", "on_demand", "on_demand_open"}
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    from schemas.keys import RedisKeys
    from serving.feeds import FeedBuilder

    with EmbeddedRedis() as redis_srv, EmbeddedKafka() as kafka:
        settings = Settings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_srv.url)
        ensure_streamrec_topics(settings)
        client = sync_redis(redis_srv.url)
        users = simulated_serving_state(settings, client, args.users)
        builder = FeedBuilder(settings, client)
        while builder.refresh_round():
            pass
        keys = RedisKeys(settings.key_prefix)
        port, metrics_port = free_port(), free_port()
        env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "STREAMREC_REDIS_URL": redis_srv.url, "STREAMREC_API_KEYS": BENCH_KEY,
               "STREAMREC_API_METRICS_PORT": str(metrics_port)}
        if args.neighbourhoods == "counted":
            env["STREAMREC_NEIGHBOURHOODS_INTERVAL_S"] = "0"  # off: the API counts its own
        api = subprocess.Popen([sys.executable, "-m", "infra.cli", "api", "--port", str(port),
                                "--loglevel", "warning", "--workers", str(args.workers)],
                               env=env, cwd=ROOT)
        pids = {"api": api.pid, "redis": redis_srv.proc.pid}
        feeds = None
        if args.neighbourhoods == "published":
            feeds = subprocess.Popen([sys.executable, "-m", "infra.cli", "feeds"], env=env,
                                     cwd=ROOT)
            pids["feed_builder"] = feeds.pid
        if args.pin:  # the API on the last core; everything else (load, Redis) on the rest
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(api.pid, cores[-1:])
            for pid in (redis_srv.proc.pid, *([feeds.pid] if feeds else []), 0):
                os.sched_setaffinity(pid, cores[:-1])
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            result = {"workers": args.workers, "concurrency": args.concurrency,
                      "users": len(users), "neighbourhoods": args.neighbourhoods}
            if "floor" in chosen:
                result.update(figures("redis_get_floor", in_process(
                    redis_floor, redis_srv.url, [keys.feed(u) for u in users], args.seconds)))
            feed, lists = "/v1/users/{user}/feed", "/v1/users/{user}/recommendations?k=20"
            for key, name, path, rate in (
                    ("feed", "feed_read", feed, 0),
                    ("feed_open", f"feed_read_at_{args.feed_rate:g}", feed, args.feed_rate),
                    ("on_demand", "on_demand", lists, 0),
                    ("on_demand_open", f"on_demand_at_{args.on_demand_rate:g}", lists,
                     args.on_demand_rate)):
                if key not in chosen:
                    continue
                result.update(phase(
                    name, pids, f"http://127.0.0.1:{metrics_port}/metrics" if path == lists
                    else None, load, url, users, path, args.seconds, args.concurrency, rate))
        finally:
            terminate(api)
            if feeds is not None:
                terminate(feeds)
    print_result(result)
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
