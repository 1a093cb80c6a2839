"""HTTP API under load: stored-feed reads and on-demand lists, the load generator in its own
process, against a real API (uvicorn), redis-server and broker on this machine.

Feeds are built for ``--users`` simulated users, then for ``--seconds`` each a load process
keeps ``--concurrency`` requests in flight (httpx, HTTP/1.1 keep-alive) on
``GET /v1/users/<u>/feed`` and then on ``GET /v1/users/<u>/recommendations``. Baseline in the
same run: the same load process doing the feed read's Redis GET directly (the floor an API
process adds its cost to). Usage: ``python bench/api.py [--workers 1] [--concurrency 50]``.
Last line: JSON.
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

from bench.report import print_result  # noqa: E402
from infra.embedded import (EmbeddedKafka, EmbeddedRedis, ensure_streamrec_topics,  # noqa: E402
                            free_port, terminate)
from infra.redis_client import sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402


#: Authenticated callers are not rate-limited (anonymous on-demand lists are).
BENCH_KEY = "bench-api-key-0000000001"


def load(url: str, users: list[str], path: str, seconds: float, concurrency: int,
         out) -> None:
    """In a process of its own: ``concurrency`` loops of requests for ``seconds``."""
    import httpx

    async def main():
        latencies, errors = [], 0
        deadline = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30,
                                     headers={"X-API-Key": BENCH_KEY}) as client:
            async def worker(n: int):
                nonlocal errors
                k = n
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    response = await client.get(path.format(user=users[k % len(users)]))
                    latencies.append(time.perf_counter() - start)
                    errors += response.status_code != 200
                    k += concurrency
            started = time.perf_counter()
            await asyncio.gather(*(worker(n) for n in range(concurrency)))
            return latencies, errors, time.perf_counter() - started

    latencies, errors, elapsed = asyncio.run(main())
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


def figures(name: str, result) -> dict:
    latencies, errors, elapsed = result
    ms = np.array(latencies) * 1000
    return {f"{name}_rps": round(len(ms) / elapsed), f"{name}_p50_ms": round(float(
        np.percentile(ms, 50)), 2), f"{name}_p99_ms": round(float(np.percentile(ms, 99)), 2),
        f"{name}_errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="API processes")
    args = parser.parse_args()
    from schemas.keys import RedisKeys
    from serving.feeds import FeedBuilder
    from stream.simulator import UserSimulator
    from stream.state import LiveState

    with EmbeddedRedis() as redis_srv, EmbeddedKafka() as kafka:
        settings = Settings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_srv.url)
        ensure_streamrec_topics(settings)
        client = sync_redis(redis_srv.url)
        events = list(UserSimulator(args.users, 5000, seed=1).events(20 * args.users,
                                                                     time.time() - 3600))
        LiveState(settings, client).apply_sync(events)
        users = sorted({e.user_id for e in events})
        builder = FeedBuilder(settings, client)
        while builder.refresh_round():
            pass
        keys = RedisKeys(settings.key_prefix)
        port = free_port()
        env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "STREAMREC_REDIS_URL": redis_srv.url, "STREAMREC_API_KEYS": BENCH_KEY}
        api = subprocess.Popen([sys.executable, "-m", "infra.cli", "api", "--port", str(port),
                                "--loglevel", "warning", "--workers", str(args.workers)],
                               env=env, cwd=ROOT)
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
                      "users": len(users)}
            result.update(figures("redis_get_floor", in_process(
                redis_floor, redis_srv.url, [keys.feed(u) for u in users], args.seconds)))
            result.update(figures("feed_read", in_process(
                load, url, users, "/v1/users/{user}/feed", args.seconds, args.concurrency)))
            result.update(figures("on_demand", in_process(
                load, url, users, "/v1/users/{user}/recommendations?k=20", args.seconds,
                args.concurrency)))
        finally:
            terminate(api)
    print_result(result)
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
