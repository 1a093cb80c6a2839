"""``streamrec``: one sub-command per process role. Every option also reads an env var."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys


def _env(name: str, default):
    """The option's default: ``name``'s value where it is set (a string: an option with a
    ``type`` parses and checks it as it would the command line), else ``default``."""
    return os.environ.get(name) or default


def _number(kind: type = int, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` reading a ``kind`` within the bounds given (``*_open``: the bound
    itself excluded); anything else is a one-line error naming what is accepted."""
    noun = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        wanted = f"{noun} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{noun} {'>' if low_open else '≥'} {low:g}"
    else:
        wanted = noun

    def inside(value) -> bool:
        if value != value or abs(value) == float("inf"):  # nan, inf
            return False
        if low is not None and (value < low or (low_open and value == low)):
            return False
        return high is None or value < high or (value == high and not high_open)

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not inside(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
        return value

    parse.__name__ = noun  # what argparse names in its own messages
    return parse


_COUNT, _WHOLE, _NATURAL = _number(int, 1), _number(int), _number(int, 0)
_POSITIVE, _NON_NEGATIVE, _SHARE = _number(float, 0, low_open=True), _number(float, 0), \
    _number(float, 0, 1)


def _cluster_primaries(text: str) -> int:
    value = _NATURAL(text)
    if value in (1, 2):
        raise argparse.ArgumentTypeError(f"must be 0 (one redis-server) or at least 3 (Redis "
                                         f"Cluster needs 3 primaries), not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block): ``<prog>: error: <what>`` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def tune_gc() -> None:
    """Collect cycles less often in a long-running worker. With CPython's default thresholds
    the apply path triggers ~7 collections per 1,000 events and full ones paused it 50 ms
    (6 % of its time, measured with ``bench/apply.py``); the code and objects loaded at start
    live forever and are frozen out of collections."""
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def build_worker_state(settings) -> None:
    """Build the worker's state on Redis before it joins its group (its models, the items
    agent's, the owned layout's owners' client), waiting while Redis cannot be reached (a
    worker may start before Redis, or during an outage): warnings and
    ``streamrec_redis_unavailable_total`` meanwhile, never an exit. A layout or partition
    count other than Redis records stops the worker in one line (exit 2)."""
    import time

    from infra.redis_client import TRANSIENT_REDIS_ERRORS, note_redis_error, retry_delays
    from stream.ingest import live_state
    from stream.items import content_models

    builders = [live_state, content_models]
    if settings.state_writer == "owned":
        from stream.owners import owners_redis
        builders.append(owners_redis)
    log, delays = logging.getLogger("streamrec.cli"), retry_delays(settings.redis_retry_max_s)
    while True:
        try:
            for build in builders:
                build()
            return
        except TRANSIENT_REDIS_ERRORS as exc:
            delay = next(delays)
            note_redis_error(log, "building the worker's state (before it joins its group)",
                             exc, delay)
            time.sleep(delay)


def cmd_worker(args: argparse.Namespace) -> None:
    """Run the Faust worker (ingest and items agents)."""
    from infra.embedded import ensure_streamrec_topics
    from infra.settings import Settings
    from online_models.registry import build_live

    settings = Settings()
    settings.require_services()
    for name in settings.live_model_names:  # a wrong name fails here, in one line
        build_live(name, **settings.model_options.get(name, {}))
    ensure_streamrec_topics(settings)
    serve_role_metrics(settings.worker_metrics_port, settings.worker_metrics_host, "worker")
    import stream.items  # noqa: F401 - registers the items agent
    if settings.state_writer == "owned":
        import stream.owners  # noqa: F401 - registers the relay and the owners' agent
    from stream.ingest import app  # registers the ingest agent and tasks

    build_worker_state(settings)

    tune_gc()
    sys.argv = ["streamrec-worker", "worker", "-l", args.loglevel]
    app.main()


def cmd_api(args: argparse.Namespace) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    from infra.settings import Settings
    from serving.api import create_app

    settings = Settings()
    if not settings.redis_url:
        settings.require_services()
    host, port = args.host or settings.api_host, args.port or settings.api_port
    require_free_port(host, port, "API")
    if settings.api_metrics_port:
        require_free_port(settings.api_metrics_host, settings.api_metrics_port,
                          "API's metrics")
    if args.workers > 1:  # processes, each building its app from the same STREAMREC_* env
        with contextlib.ExitStack() as scope:
            if settings.api_metrics_port:  # the workers' sum, served from this process
                from serving.metrics import WorkerMetrics

                scope.enter_context(WorkerMetrics(settings.api_metrics_port,
                                                  settings.api_metrics_host))
            uvicorn.run("serving.api:create_app", factory=True, workers=args.workers,
                        host=host, port=port, log_level=args.loglevel)
    else:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=args.loglevel)


@contextlib.contextmanager
def binding(host: str, port: int, what: str):
    """Around a bind of ``host:port``: a failure (taken, or an address not of this machine) is
    one line and exit 2, not a server's traceback."""
    try:
        yield
    except OSError as exc:
        raise CommandError(f"the {what} port {host}:{port}: {exc.strerror or exc}") from None


def require_free_port(host: str, port: int, what: str) -> None:
    """Fail now, in one line, where a server started later could not bind ``host:port``
    (port 0, any free one, passes)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe, \
            binding(host, port, what):
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        probe.bind((host, port))


def serve_role_metrics(port: int, host: str, role: str) -> None:
    """Serve this process's Prometheus metrics on ``host:port`` from a thread (0: off)."""
    if not port:
        return
    from prometheus_client import start_http_server

    with binding(host, port, f"{role}'s metrics"):
        start_http_server(port, addr=host)


def cmd_feeds(_args: argparse.Namespace) -> None:
    """Run the feed builder loop."""
    from infra.redis_client import sync_redis
    from infra.settings import Settings
    from serving.feeds import FeedBuilder

    settings = Settings()
    settings.require_services()
    serve_role_metrics(settings.feeds_metrics_port, settings.feeds_metrics_host, "feed builder")
    builder = FeedBuilder.live(settings, sync_redis(settings.redis_url))
    try:
        builder.run()
    finally:
        builder.close()


def cmd_trainer(args: argparse.Namespace) -> None:
    """Nearline training: versions of a PyTorch model as checkpoints and vector topics."""
    import logging

    from infra.embedded import ensure_streamrec_topics
    from infra.settings import Settings
    from online_models.registry import NEARLINE_MODELS
    from stream.trainer import Trainer, rollback

    settings = Settings()
    settings.require_services()
    if not settings.trainer_dir:
        raise CommandError("set STREAMREC_TRAINER_DIR (the checkpoint folder the API and "
                           "feed builder read)")
    if args.model not in NEARLINE_MODELS:
        raise CommandError(f"--model must be one of {', '.join(NEARLINE_MODELS)}, "
                           f"not {args.model!r}")
    ensure_streamrec_topics(settings)
    if args.rollback is not None:
        try:
            items = rollback(settings, args.model, args.rollback)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        print(f"{args.model}: CURRENT is version {args.rollback}; {items} item vectors "
              "published again")
        return
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        trainer = Trainer(settings, args.model)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    serve_role_metrics(settings.trainer_metrics_port, settings.trainer_metrics_host, "trainer")
    try:
        trainer.run()
    finally:
        trainer.close()


def cmd_produce(args: argparse.Namespace) -> None:
    """Publish a log file (at N× real time) or simulated traffic to Kafka."""
    import time

    from infra.settings import Settings
    from replay.loaders import iter_realtime, load_log
    from stream.producer import InteractionProducer
    from stream.simulator import UserSimulator

    settings = Settings()
    settings.require_services()
    if args.log:
        events = load_log(args.log, args.format)[: args.limit or None]
    else:
        sim = UserSimulator(args.users, args.items, seed=args.seed)
        events = list(sim.events(args.limit or 10_000, start_ts=time.time()))
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_message_bytes=settings.max_message_bytes,
                             client_options=settings.kafka_client_options()) as producer:
        started = time.monotonic()
        for due, event in iter_realtime(events, args.speed):
            delay = due - (time.monotonic() - started)
            if delay > 0.005:
                time.sleep(delay)
            producer.send(event)
        producer.flush()
    elapsed = time.monotonic() - started
    print(json.dumps({"events": len(events), "seconds": round(elapsed, 3),
                      "events_per_s": round(len(events) / max(elapsed, 1e-9))}))


def cmd_erase(args: argparse.Namespace) -> None:
    """Erase what the workers learned of a user (their user- and session-keyed model state,
    history, feed, place in the feed queue): an erasure request on the user's partition,
    after the user's earlier events; with --wait, until a worker has applied it."""
    from infra.redis_client import sync_redis
    from infra.settings import Settings
    from schemas.events import InvalidEvent
    from schemas.keys import RedisKeys
    from stream.log_positions import wait_until_applied
    from stream.producer import DeliveryError, InteractionProducer

    settings = Settings()
    settings.require_services()
    try:
        with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                                 max_message_bytes=settings.max_message_bytes,
                                 client_options=settings.kafka_client_options()) as producer:
            receipt = producer.erase_user(args.user, args.session, args.request_id)
    except InvalidEvent as exc:
        raise CommandError(f"invalid erasure request: {exc}") from None
    except (DeliveryError, ValueError) as exc:
        raise CommandError(f"{settings.topic_interactions} on {settings.kafka_bootstrap}: "
                           f"{exc}") from None
    applied = None
    if args.wait:
        applied = wait_until_applied(sync_redis(settings.redis_url),
                                     RedisKeys(settings.key_prefix), receipt.topic,
                                     receipt.partition, receipt.offset, args.wait)
    print(json.dumps({"request_id": receipt.request_id, "user_id": receipt.user_id,
                      "topic": receipt.topic, "partition": receipt.partition,
                      "offset": receipt.offset, "applied": applied}))
    if args.wait and not applied:
        print(f"streamrec erase: sent, not applied within {args.wait:g} s: is a worker "
              f"consuming {receipt.topic}[{receipt.partition}]? (it applies the request when "
              f"it gets there)", file=sys.stderr)
        sys.exit(1)


def cmd_services(args: argparse.Namespace) -> None:
    """Start an embedded broker and redis-server (or a local Redis Cluster) and print the env
    vars that reach them."""
    import time

    from infra.embedded import (EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster,
                                stop_on_sigterm)

    stop_on_sigterm()  # stopped by a supervisor: the services go with it
    redis_service = (EmbeddedRedisCluster(args.redis_cluster) if args.redis_cluster
                     else EmbeddedRedis())
    try:  # a SIGTERM at any point, even right after the exports are out, stops both
        with redis_service as redis_srv, EmbeddedKafka() as kafka:
            print(f"export STREAMREC_KAFKA_BOOTSTRAP={kafka.bootstrap}")
            if args.redis_cluster:
                print("export STREAMREC_STATE_WRITER=single")
            print(f"export STREAMREC_REDIS_URL={redis_srv.url}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass


def cmd_schema(args: argparse.Namespace) -> None:
    """Print (or write) the JSON Schema of an interactions (or, --items, items) message."""
    from schemas import events, items

    schema = (items if getattr(args, "items", False) else events).json_schema()
    text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)


def cmd_replay(args: argparse.Namespace) -> None:
    """Replay a log through models, test-then-train; print the table, write JSON (+ HTML)."""
    import time

    from online_models.registry import resolve_names
    from replay.loaders import load_items, load_split
    from replay.protocols import run
    from replay.report import markdown_table, write_outputs

    started = time.time()
    names = resolve_names(args.models)  # a typo fails before the log is read
    train, test = load_split(args.data, args.format, args.test_days)
    items = [] if args.no_items else load_items(args.data, args.format)
    store_factory = None
    if args.store == "redis":
        from infra.redis_client import is_cluster, sync_redis
        from infra.settings import Settings
        from state.redis_store import RedisStore

        settings = Settings()
        settings.require_services()
        client = sync_redis(settings.redis_url)
        if is_cluster(client):
            raise CommandError("--store redis needs one Redis server (its rows are added to "
                               "in place), not a cluster: point STREAMREC_REDIS_URL at one")
        store_factory = lambda name: RedisStore(client, settings.key_prefix,  # noqa: E731
                                                f"replay-{int(started)}-{name}")
    results = run(args.protocol, train, test, names, ks=tuple(sorted({10, 20, args.k})),
                  chunk=args.chunk, learn_during_test=args.learn_during_test,
                  store_factory=store_factory, progress=not args.quiet, warmup=args.warmup,
                  items=items)
    meta = {"item_descriptions": len(items), "data": str(args.data), "format": args.format,
            "protocol": args.protocol,
            "train_events": len(train), "test_events": len(test), "chunk": args.chunk,
            "learn_during_test": args.learn_during_test, "store": args.store,
            "warmup": args.warmup,
            "seconds": round(time.time() - started, 1)}
    write_outputs(results, meta, args.out, args.html or None, n_boot=args.bootstrap)
    print(markdown_table(results))
    print(f"wrote {args.out}" + (f" and {args.html}" if args.html else ""))


def cmd_ope(args: argparse.Namespace) -> None:
    """Off-policy check on the Open Bandit Dataset: the TS policy's CTR from the random log."""
    from pathlib import Path

    from replay.ope import open_bandit_check
    from replay.report import ope_report

    checks = []
    for campaign in args.campaigns.split(","):
        checks.append(open_bandit_check(args.data, campaign, n_boot=args.bootstrap,
                                        seed=args.seed))
        print(json.dumps(checks[-1]), flush=True)
    if args.html:
        meta = {"data": str(args.data), "campaigns": args.campaigns,
                "bootstrap": args.bootstrap, "seed": args.seed}
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(ope_report(checks, meta))
        print(f"wrote {args.html}")


def cmd_docs(_args: argparse.Namespace) -> None:
    """Regenerate docs/redis-keys.md, docs/configuration.md and the event JSON Schema."""
    from pathlib import Path

    from infra.docs import write_docs

    for path in write_docs():
        print(f"wrote {path}")
    for name, items in (("interaction", False), ("item", True)):
        out = Path(__file__).resolve().parents[1] / "schemas" / f"{name}.schema.json"
        cmd_schema(argparse.Namespace(out=str(out), items=items))
        print(f"wrote {out}")


def cmd_offsets(args: argparse.Namespace) -> None:
    """Show each partition's Redis watermark against its Kafka log; with --reset, choose
    where a held partition resumes (the running worker sees it within one check interval
    and restarts to resume there)."""
    from infra.redis_client import sync_redis
    from infra.settings import Settings
    from schemas.keys import RedisKeys
    from stream.log_positions import (LogEndProbe, find_mismatches, hold, read_progress,
                                      reset_partition, reset_target)

    settings = Settings()
    settings.require_services()
    topic, keys = settings.topic_interactions, RedisKeys(settings.key_prefix)
    probe = LogEndProbe(settings.kafka_bootstrap, settings.kafka_client_options())
    try:
        topic_id = probe.topic_id(topic)
        known, starts, ends = probe.bounds(topic)
        if not known:
            raise LogPositionError(f"topic {topic!r} has no partitions on "
                                   f"{settings.kafka_bootstrap}")
        chosen = args.partition or known
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise LogPositionError(f"{topic} has no partition {unknown[0]} (it has {known})")
        client = sync_redis(settings.redis_url)
        if args.reset:
            for partition in chosen:
                try:
                    target = reset_target(args.reset, starts[partition], ends[partition])
                except ValueError as exc:
                    raise LogPositionError(str(exc)) from None
                reset_partition(client, keys, topic, partition, target, topic_id)
                print(f"{topic}[{partition}]: next offset to apply = {target}")
        marks, applied_ids = read_progress(client, keys, topic, known)
        bad = {m.partition: m.reason for m in probe.confirm(
            find_mismatches(topic, marks, starts, ends, applied_ids, topic_id))}
    finally:
        probe.close()
    held = hold(client, keys)
    for partition in known:
        print(json.dumps({"topic": topic, "partition": partition, "watermark": marks[partition],
                          "log_start": starts[partition], "log_end": ends[partition],
                          "topic_id": topic_id, "applied_topic_id": applied_ids[partition],
                          "fits": partition not in bad,
                          "held_by_worker": (topic, partition) in held}))
    if bad and not args.reset:
        for reason in bad.values():
            print(reason, file=sys.stderr)
        sys.exit(1)


def cmd_dlq(args: argparse.Namespace) -> None:
    """Summarise the dead-letter topic (reasons, sources, what a re-drive would publish); with
    --redrive, publish again what today's decoder accepts and was not applied then (events
    keep their ids), and record the progress in a consumer group."""
    from kafka.errors import KafkaError

    from infra.settings import Settings
    from stream.dead_letters import DeadLetterReader, Summary, redrive_dead_letters
    from stream.producer import DeliveryError

    settings = Settings()
    if not settings.kafka_bootstrap:
        raise CommandError("set STREAMREC_KAFKA_BOOTSTRAP (the cluster whose dead letters to "
                           "read)")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its retries: the error says why
    try:
        reader = DeadLetterReader(settings.kafka_bootstrap, settings.topic_dlq, args.group,
                                  args.from_beginning, settings.kafka_client_options())
    except (LookupError, KafkaError) as exc:
        raise CommandError(f"{settings.topic_dlq}: {exc}") from None
    summary = Summary()
    try:
        redrive_dead_letters(reader, summary, settings, send=args.redrive)
    except (DeliveryError, TimeoutError, LookupError) as exc:
        print(json.dumps(summary.as_dict(sent=args.redrive)))
        print(f"streamrec dlq: stopped: {_one_line(exc)}; run it again (a re-drive's progress "
              f"is committed up to the last batch Kafka acknowledged)", file=sys.stderr)
        sys.exit(1)
    finally:
        reader.close()
    print(json.dumps(summary.as_dict(sent=args.redrive), indent=2))


def cmd_expire_untimed(args: argparse.Namespace) -> None:
    """Give each live model's state keys that have no TTL their table's TTL (the single writer
    writes them without one and expires them itself; run this after retiring it for good:
    a writer that starts does the same)."""
    from infra.redis_client import sync_redis
    from infra.settings import Settings
    from state.redis_store import build_live_models, give_untimed_keys_ttls

    settings = Settings()
    if not settings.redis_url:
        raise CommandError("STREAMREC_REDIS_URL not set: point it at the Redis holding the "
                           "state")
    client = sync_redis(settings.redis_url)
    models = build_live_models(settings, client)
    for name, model in models.items():
        print(json.dumps({"model": name, "keys_given_a_ttl": give_untimed_keys_ttls(model.store)}))


class CommandError(ValueError):
    """A command asked for what it cannot do as given (a setting missing, an unknown name)."""


class LogPositionError(CommandError):
    """A bad ``streamrec offsets`` request (unknown partition, offset outside the log)."""


def cmd_demo(args: argparse.Namespace) -> None:
    """Embedded services + worker + API + feed builder + traffic, then a summary."""
    from infra.demo import run_demo

    sys.exit(run_demo(args))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help=cmd_worker.__doc__)
    worker.add_argument("--loglevel", default=_env("STREAMREC_LOGLEVEL", "info"),
                        choices=["crit", "error", "warn", "info", "debug"],
                        help="log level [STREAMREC_LOGLEVEL]")
    worker.set_defaults(func=cmd_worker)

    api = sub.add_parser("api", help=cmd_api.__doc__)
    api.add_argument("--host", default=None, help="bind address [STREAMREC_API_HOST]")
    api.add_argument("--port", type=_number(int, 1, 65535), default=None,
                     help="port [STREAMREC_API_PORT]")
    api.add_argument("--loglevel", default=_env("STREAMREC_LOGLEVEL", "info"),
                     help="log level [STREAMREC_LOGLEVEL]")
    api.add_argument("--workers", type=_COUNT, default=_env("STREAMREC_API_WORKERS", 1),
                     help="API processes sharing the port [STREAMREC_API_WORKERS]")
    api.set_defaults(func=cmd_api)

    sub.add_parser("feeds", help=cmd_feeds.__doc__).set_defaults(func=cmd_feeds)
    trainer = sub.add_parser("trainer", help=cmd_trainer.__doc__)
    trainer.add_argument("--model", default="two_tower", help="nearline model to train")
    trainer.add_argument("--rollback", type=_NATURAL, default=None, metavar="VERSION",
                         help="point CURRENT at a kept version, publish its vectors, exit")
    trainer.add_argument("--loglevel", default="info")
    trainer.set_defaults(func=cmd_trainer)

    produce = sub.add_parser("produce", help=cmd_produce.__doc__)
    produce.add_argument("--log", default=_env("STREAMREC_PRODUCE_LOG", ""),
                         help="log file or folder; simulated traffic when empty "
                              "[STREAMREC_PRODUCE_LOG]")
    produce.add_argument("--format", default=_env("STREAMREC_PRODUCE_FORMAT", "yoochoose"),
                         help="log format: yoochoose, otto [STREAMREC_PRODUCE_FORMAT]")
    produce.add_argument("--speed", type=_POSITIVE, default=_env("STREAMREC_PRODUCE_SPEED", 1000.0),
                         help="replay speed, × real time [STREAMREC_PRODUCE_SPEED]")
    produce.add_argument("--limit", type=_NATURAL, default=_env("STREAMREC_PRODUCE_LIMIT", 0),
                         help="events to send, 0 = all [STREAMREC_PRODUCE_LIMIT]")
    produce.add_argument("--users", type=_COUNT, default=_env("STREAMREC_SIM_USERS", 1000),
                         help="simulated users [STREAMREC_SIM_USERS]")
    produce.add_argument("--items", type=_COUNT, default=_env("STREAMREC_SIM_ITEMS", 5000),
                         help="simulated items [STREAMREC_SIM_ITEMS]")
    produce.add_argument("--seed", type=_WHOLE, default=_env("STREAMREC_SIM_SEED", 0),
                         help="simulator seed [STREAMREC_SIM_SEED]")
    produce.set_defaults(func=cmd_produce)

    services = sub.add_parser("services", help=cmd_services.__doc__)
    services.add_argument("--redis-cluster", type=_cluster_primaries, default=0, metavar="N",
                          help="a Redis Cluster of N primaries (redis-server --cluster-enabled) "
                               "instead of one redis-server")
    services.set_defaults(func=cmd_services)

    schema = sub.add_parser("schema", help=cmd_schema.__doc__)
    schema.add_argument("--out", default="", help="write to this file instead of stdout")
    schema.add_argument("--items", action="store_true",
                        help="the items topic's message (item descriptions) instead")
    schema.set_defaults(func=cmd_schema)

    sub.add_parser("docs", help=cmd_docs.__doc__).set_defaults(func=cmd_docs)

    ope = sub.add_parser("ope", help=cmd_ope.__doc__)
    ope.add_argument("--data", required=True, help="the open-bandit-sample folder")
    ope.add_argument("--campaigns", default="all,men,women")
    ope.add_argument("--bootstrap", type=_COUNT, default=1000, help="bootstrap resamples")
    ope.add_argument("--seed", type=_WHOLE, default=0)
    ope.add_argument("--html", default="", help="also write an HTML report here")
    ope.set_defaults(func=cmd_ope)

    replay = sub.add_parser("replay", help=cmd_replay.__doc__)
    replay.add_argument("--data", required=True, help="log file, or folder with train/test files")
    replay.add_argument("--format", default=_env("STREAMREC_REPLAY_FORMAT", "yoochoose"),
                        help="log format (see replay/loaders.py) [STREAMREC_REPLAY_FORMAT]")
    replay.add_argument("--protocol", choices=["prequential", "session", "user"],
                        default=_env("STREAMREC_REPLAY_PROTOCOL", "session"),
                        help="evaluation protocol [STREAMREC_REPLAY_PROTOCOL]")
    replay.add_argument("--models", default=_env("STREAMREC_REPLAY_MODELS", "session,cooc,mf"),
                        help="comma-separated model names, or all; random and popularity are "
                             "always added [STREAMREC_REPLAY_MODELS]")
    replay.add_argument("--out", default=_env("STREAMREC_REPLAY_OUT", "results.json"),
                        help="JSON results [STREAMREC_REPLAY_OUT]")
    replay.add_argument("--html", default=_env("STREAMREC_REPLAY_HTML", ""),
                        help="also write an HTML report here [STREAMREC_REPLAY_HTML]")
    replay.add_argument("--test-days", type=_POSITIVE, default=_env("STREAMREC_TEST_DAYS", 1.0),
                        help="for one-file logs: sessions starting in the last N days are the "
                             "test set [STREAMREC_TEST_DAYS]")
    replay.add_argument("--k", type=_COUNT, default=20, help="cut-off besides 10 and 20")
    replay.add_argument("--chunk", type=_COUNT, default=_env("STREAMREC_REPLAY_CHUNK", 1000),
                        help="events per learn batch [STREAMREC_REPLAY_CHUNK]")
    replay.add_argument("--warmup", type=_number(float, 0, 1, high_open=True),
                        default=_env("STREAMREC_REPLAY_WARMUP", 0.1),
                        help="user protocol: share of positives replayed but not scored "
                             "[STREAMREC_REPLAY_WARMUP]")
    replay.add_argument("--no-items", action="store_true",
                        help="ignore the item descriptions beside the log (MovieLens "
                             "movies.csv/tags.csv: read by default)")
    replay.add_argument("--learn-during-test", action="store_true",
                        help="session protocol: also learn test events after predicting them")
    replay.add_argument("--store", choices=["memory", "redis"], default="memory",
                        help="model state store (redis: STREAMREC_REDIS_URL)")
    replay.add_argument("--bootstrap", type=_COUNT, default=1000,
                        help="bootstrap resamples for the 95 %% intervals and paired tests")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=cmd_replay)

    offsets = sub.add_parser("offsets", help=cmd_offsets.__doc__)
    offsets.add_argument("--reset", default="", metavar="start|end|OFFSET",
                         help="make this the next offset applied (start: the log's first "
                              "retained offset; end: skip to the log's end)")
    offsets.add_argument("--partition", type=_NATURAL, action="append", default=[],
                         help="partition to show or reset (repeat; default: all)")
    offsets.set_defaults(func=cmd_offsets)

    dlq = sub.add_parser("dlq", help=cmd_dlq.__doc__)
    dlq.add_argument("--redrive", action="store_true",
                     help="publish again what is valid now (default: only say what would be)")
    dlq.add_argument("--group", default="streamrec-dlq-redrive",
                     help="consumer group that records how far re-drives got")
    dlq.add_argument("--from-beginning", action="store_true",
                     help="start at the topic's first record, not after the last re-drive "
                          "(events re-driven more than STREAMREC_DEDUP_TTL_S ago would apply "
                          "twice)")
    dlq.set_defaults(func=cmd_dlq)

    erase = sub.add_parser("erase", help=cmd_erase.__doc__)
    erase.add_argument("user", help="the user id to erase")
    erase.add_argument("--session", action="append", default=[], metavar="SESSION_ID",
                       help="a session of the user to erase too (repeat; the session keyed "
                            "by the user id, for events without one, always goes)")
    erase.add_argument("--request-id", default=None,
                       help="the request's id (default: a new random one)")
    erase.add_argument("--wait", type=_NON_NEGATIVE, default=0.0, metavar="SECONDS",
                       help="wait up to this long for a worker to apply it (exit 1 if not)")
    erase.set_defaults(func=cmd_erase)

    expire = sub.add_parser("expire-untimed", help=cmd_expire_untimed.__doc__)
    expire.set_defaults(func=cmd_expire_untimed)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--duration", type=_NON_NEGATIVE,
                      default=_env("STREAMREC_DEMO_DURATION", 0.0),
                      help="seconds of traffic, then summary and exit 0; 0 = traffic for "
                           "--traffic-s, then serve until Ctrl-C [STREAMREC_DEMO_DURATION]")
    demo.add_argument("--traffic-s", type=_POSITIVE, default=_env("STREAMREC_DEMO_TRAFFIC_S", 30.0),
                      help="seconds of traffic when no --duration [STREAMREC_DEMO_TRAFFIC_S]")
    demo.add_argument("--rate", type=_POSITIVE, default=_env("STREAMREC_DEMO_RATE", 2000.0),
                      help="simulated events per second [STREAMREC_DEMO_RATE]")
    demo.add_argument("--users", type=_COUNT, default=_env("STREAMREC_SIM_USERS", 2000),
                      help="simulated users [STREAMREC_SIM_USERS]")
    demo.add_argument("--items", type=_COUNT, default=_env("STREAMREC_SIM_ITEMS", 5000),
                      help="simulated items [STREAMREC_SIM_ITEMS]")
    demo.add_argument("--seed", type=_WHOLE, default=_env("STREAMREC_SIM_SEED", 0),
                      help="simulator seed [STREAMREC_SIM_SEED]")
    demo.add_argument("--log", default=_env("STREAMREC_DEMO_LOG", ""),
                      help="replay this log instead of simulating [STREAMREC_DEMO_LOG]")
    demo.add_argument("--format", default=_env("STREAMREC_DEMO_FORMAT", "yoochoose"),
                      help="format of --log [STREAMREC_DEMO_FORMAT]")
    demo.add_argument("--malformed-rate", type=_SHARE,
                      default=_env("STREAMREC_DEMO_MALFORMED_RATE", 0.01),
                      help="share of deliberately malformed messages, to show the DLQ "
                           "[STREAMREC_DEMO_MALFORMED_RATE]")
    demo.add_argument("--out", default=_env("STREAMREC_DEMO_OUT", "demo-out"),
                      help="folder for logs and summary.json [STREAMREC_DEMO_OUT]")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("kafka", "httpx", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python 3 warns whenever one step of its network loop takes over 0.1 s, which a
    # busy machine's scheduler alone causes: noise on stderr (before a one-line CLI error)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:
        if not isinstance(exc, _bad_input_errors()):
            raise  # a bug: the traceback is what a report needs
        parser.exit(2, f"streamrec {args.command}: error: {_one_line(exc)}\n")


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the input is wrong, not the program (a Redis the settings name that
    cannot be reached counts): one line and exit status 2."""
    from pydantic import ValidationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from online_models.registry import UnknownModelError
    from replay.loaders import LogFormatError
    from infra.embedded import TopicPartitionsMismatch
    from infra.settings import ServicesNotSet
    from state.redis_store import StateLayoutError

    return (LogFormatError, UnknownModelError, CommandError, ServicesNotSet, ValidationError,
            StateLayoutError, TopicPartitionsMismatch,
            FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            UnicodeDecodeError, RedisConnectionError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    main()
