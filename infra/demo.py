"""``streamrec demo``: the whole live loop on one machine, ending in feeds people can read.

Starts (unless ``STREAMREC_KAFKA_BOOTSTRAP``/``STREAMREC_REDIS_URL`` point elsewhere) a real
broker and redis-server, a worker process, an API process and a feed builder, then sends
simulated users' traffic (or a replayed log) with a small share of malformed messages, waits
until the worker has applied everything, and prints a summary. With ``--duration`` it exits 0
afterwards; otherwise it keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from infra.embedded import (EmbeddedKafka, EmbeddedRedis, ensure_streamrec_topics, free_port,
                            stop_on_sigterm, terminate)
from infra.progress import progress
from infra.redis_client import cluster_seed, sync_redis
from infra.settings import Settings
from schemas.keys import RedisKeys, encode_id
from serving.feeds import FeedBuilder
from stream.log_positions import wait_until_applied
from stream.producer import InteractionProducer, ItemPublisher
from stream.simulator import MALFORMED_KINDS, UserSimulator, malformed_message


def _spawn(role: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([sys.executable, "-m", "infra.cli", *role], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _traffic(args: argparse.Namespace):
    """(events, item descriptions) to send: a replayed log (with the descriptions beside it,
    e.g. MovieLens movies.csv), or simulated users for the duration."""
    if args.log:
        from replay.loaders import load_items, load_log

        events = load_log(args.log, args.format)
        seconds = args.duration or args.traffic_s
        return (events[: int(args.rate * seconds)] if seconds else events,
                load_items(args.log, args.format))
    seconds = args.duration or args.traffic_s
    sim = UserSimulator(args.users, args.items, seed=args.seed)
    start = time.time() - seconds
    return (list(sim.events(int(args.rate * seconds), start_ts=start)),
            sim.item_descriptions(start - 60))


def _publish_descriptions(settings, records) -> int:
    """Send the catalogue's descriptions first (the items topic), acknowledged."""
    if not records:
        return 0
    with ItemPublisher(settings.kafka_bootstrap, settings.topic_items,
                       max_message_bytes=settings.max_message_bytes,
                       client_options=settings.kafka_client_options()) as publisher:
        publisher.send_many(records)
        publisher.flush()
    return len(records)


def run_demo(args: argparse.Namespace) -> int:
    stop_on_sigterm()  # like Ctrl-C: stop the roles started here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Settings()
    with contextlib.ExitStack() as stack:
        kafka_bootstrap, redis_url = base.kafka_bootstrap, base.redis_url
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis(appendonly=False)).url
        if not kafka_bootstrap:
            kafka_bootstrap = stack.enter_context(EmbeddedKafka()).bootstrap
        api_port = base.api_port if base.api_port and _free(base.api_port) else free_port()
        # the content model (item descriptions) joins the configured ones unless set
        # explicitly, or on a Redis Cluster (its rows are added to by two writers: refused)
        live_models = (base.live_models if "STREAMREC_LIVE_MODELS" in os.environ
                       or cluster_seed(redis_url) is not None
                       else ",".join(dict.fromkeys([*base.live_model_names, "content"])))
        settings = base.model_copy(update={"kafka_bootstrap": kafka_bootstrap,
                                           "redis_url": redis_url, "api_port": api_port,
                                           "live_models": live_models})
        print(f"kafka {kafka_bootstrap}  redis {redis_url}", flush=True)
        ensure_streamrec_topics(settings)
        env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap,
               "STREAMREC_REDIS_URL": redis_url, "STREAMREC_API_PORT": str(api_port),
               "STREAMREC_LIVE_MODELS": live_models,
               "STREAMREC_WORKER_WEB_PORT": str(free_port()),
               "STREAMREC_WORKER_DATA_DIR": str(out / "worker-data")}
        worker = _spawn(["worker", "--loglevel", "warn"], env, out / "worker.log")
        stack.callback(terminate, worker, 15)
        api = _spawn(["api", "--loglevel", "warning"], env, out / "api.log")
        stack.callback(terminate, api, 15)

        client = sync_redis(redis_url)
        stack.callback(client.close)
        keys = RedisKeys(settings.key_prefix)
        builder = FeedBuilder.live(settings, client)
        stack.callback(builder.close)
        stop_builder = threading.Event()

        def start_feeder() -> threading.Thread:
            thread = threading.Thread(target=builder.run, args=(stop_builder,), daemon=True)
            thread.start()
            return thread

        feeder = start_feeder()
        stack.callback(stop_builder.set)

        events, descriptions = _traffic(args)
        described = _publish_descriptions(settings, descriptions)
        summary = _send(settings, events, args, client, keys, worker)
        summary["item_descriptions_sent"] = described
        stop_builder.set()
        feeder.join(10)
        while builder.refresh_round():  # the last round for users still queued
            pass
        active = summary.pop("active_users")
        summary.update(_feeds_summary(builder, client, keys, active,
                                      f"http://{settings.api_host}:{api_port}"))
        summary["erasure"] = _erase_one(settings, client, keys, active[-1], worker)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
        if not args.duration:
            # feeds keep following the events people send from the explorer
            stop_builder.clear()
            start_feeder()
            print("serving until Ctrl-C ...", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while worker.poll() is None and api.poll() is None:
                    time.sleep(1)
        return 0 if (summary["feed_coverage"] >= 0.9 and summary["erasure"]["applied"]
                     and worker.poll() is None) else 1


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _send(settings, events, args, client, keys, worker) -> dict:
    """Produce at the configured rate (plus malformed messages), then wait for the worker."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(args.seed)
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                        **settings.kafka_client_options())
    malformed = 0
    baseline = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
    expected_valid = len(events)
    active = {e.user_id for e in events}
    seconds = max(len(events) / args.rate, 1e-9)
    chunk = max(1, int(args.rate / 20))
    started = time.monotonic()
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_message_bytes=settings.max_message_bytes,
                             client_options=settings.kafka_client_options()) as producer, \
            progress(len(events), "produce") as bar:
        for start in range(0, len(events), chunk):
            part = events[start:start + chunk]
            producer.send_many(part)
            for _ in range(rng.binomial(len(part), args.malformed_rate)):
                kind = MALFORMED_KINDS[malformed % len(MALFORMED_KINDS)]
                message = malformed_message(kind, malformed, like=part[-1])
                if kind == "bad_envelope_event":
                    expected_valid += 1
                    active.add(f"u-env-{malformed}")
                raw.send(settings.topic_interactions, value=message)
                malformed += 1
            bar.update(len(part))
            delay = start / len(events) * seconds - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
        producer.flush()
    raw.flush()
    raw.close()
    produce_s = time.monotonic() - started
    applied = 0
    deadline = time.monotonic() + 120
    with progress(expected_valid, "applied") as bar:
        while time.monotonic() < deadline and worker.poll() is None:
            stats = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
            applied = stats.get("events_applied", 0) - baseline.get("events_applied", 0)
            dead = stats.get("dlq_messages", 0) - baseline.get("dlq_messages", 0)
            bar.update(applied - bar.n)
            if applied >= expected_valid and dead >= malformed:
                break
            time.sleep(0.2)
    total_s = time.monotonic() - started
    stats = {k.decode(): int(v) - baseline.get(k.decode(), 0)
             for k, v in client.hgetall(keys.stats).items()}
    return {"events_produced": len(events), "malformed_messages_sent": malformed,
            "produce_seconds": round(produce_s, 2), "events_applied": applied,
            "applied_events_per_s": round(applied / total_s),
            "seconds_to_apply_all": round(total_s, 2),
            "dlq_messages": stats.get("dlq_messages", 0), "dlq_events": stats.get("dlq_events", 0),
            "active_users": sorted(active)}


def _erase_one(settings, client, keys, user: str, worker) -> dict:
    """Erase one active user through the SDK (docs/events.md#erasure): how long until the
    worker applied it, and how many keys still name the user (the erasure marker aside)."""
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             client_options=settings.kafka_client_options()) as producer:
        started = time.monotonic()
        receipt = producer.erase_user(user, request_id=f"demo-{uuid.uuid4().hex[:8]}")
    applied = wait_until_applied(client, keys, receipt.topic, receipt.partition,
                                 receipt.offset, 30, going_on=lambda: worker.poll() is None)
    seconds = time.monotonic() - started
    encoded = encode_id(user)
    named = [*client.scan_iter(match=f"{keys.prefix}:{{u:{encoded}}}:*", count=10_000),
             *client.scan_iter(match=f"{keys.prefix}:m:*{{{encoded}}}", count=10_000),
             *client.scan_iter(match=f"{keys.prefix}:m:*}}:{encoded}", count=10_000)]  # cluster
    left = [name for name in named if name.decode() != keys.erased(user)]
    return {"user_id": user, "request_id": receipt.request_id, "applied": applied,
            "seconds_to_apply": round(seconds, 2), "user_keys_left": len(left)}


#: How feed explanations begin (the rest names an item or a category).
REASON_KINDS = ("because you viewed", "because you like", "popular in")


def _feeds_summary(builder: FeedBuilder, client, keys, active: list[str], api_url: str) -> dict:
    with client.pipeline(transaction=False) as pipe:
        for user in active:
            pipe.get(keys.feed(user))
        stored = pipe.execute()
    non_empty = sum(1 for raw in stored if raw and b'"items":[]' not in raw)
    reasons: dict[str, int] = {}
    for raw in filter(None, stored):
        for item in json.loads(raw)["items"]:
            kind = next((p for p in REASON_KINDS if item["reason"].startswith(p)),
                        item["reason"])
            reasons[kind] = reasons.get(kind, 0) + 1
    samples = {}
    for user in [u for u in active if not u.startswith("u-env-")][:3]:
        try:
            samples[user] = httpx.get(f"{api_url}/v1/users/{user}/feed?k=5", timeout=5).json()
        except httpx.HTTPError as exc:
            samples[user] = {"error": repr(exc)}
    return {"active_users": len(active), "users_with_feed": non_empty,
            "feed_coverage": round(non_empty / max(len(active), 1), 4), "api": api_url,
            "feed_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "sample_feeds": samples}


def _print_summary(summary: dict) -> None:
    print("\n=== streamrec demo summary ===")
    for key, value in summary.items():
        if key != "sample_feeds":
            print(f"{key:>24}: {value}")
    for user, feed in summary["sample_feeds"].items():
        items = ", ".join(f"{i['item_id']} ({i['score']:.3g}, {i['reason']})"
                          for i in feed.get("items", []))
        print(f"  feed of {user}: {items or feed}")
    print(f"  try: curl {summary['api']}/v1/users/{next(iter(summary['sample_feeds']), 'u1')}/feed")
    print(f"  docs: {summary['api']}/docs")
    print(f"  feed explorer: {summary['api']}/explorer/  (feeds, reasons, click and watch them "
          "change)", flush=True)
