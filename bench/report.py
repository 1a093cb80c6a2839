"""What the benchmarks share: the live-path options, the shared YooChoose sample, process CPU
time, and how every benchmark ends — one aligned ``name: value`` line per figure, then the
same figures as one JSON line (the last line of output, for machines)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the tuning benches run without pydantic
    from infra.settings import Settings

YOOCHOOSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "yoochoose-rsc15-100k"


def add_live_options(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--redis-aof``, for the benches that run the worker's apply path."""
    from infra.settings import Settings

    parser.add_argument("--models", default=Settings.model_fields["live_models"].default,
                        help="live models (default: STREAMREC_LIVE_MODELS's default)")
    parser.add_argument("--redis-aof", action="store_true",
                        help="run redis-server with AOF (everysec), as infra/redis.conf does")


def add_validation_options(parser: argparse.ArgumentParser) -> None:
    """``--data`` (a training log), ``--format`` and ``--test-days``: the tuning benches."""
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="yoochoose")
    parser.add_argument("--test-days", type=float, default=1.0)


def _value(text: str):
    """A grid value: a number or ``true``/``false`` parsed, anything else kept as text."""
    if text[0].isdigit() or text[0] in "-." or text in ("true", "false"):
        return json.loads(text)
    return text


def parse_grid(text: str, flag: str = "--grid") -> list[dict]:
    """``"a=1,2;b=x"`` → every combination as keyword options (numbers and true/false parsed);
    ``"a=1,2 | b=3"``: the settings of each alternative, one after the other."""
    if "|" in text:
        return [options for part in text.split("|") for options in parse_grid(part, flag)]
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise SystemExit(f"{flag}: {part!r} is not key=value[,value...]")
        axes.append([(key.strip(), _value(v.strip())) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def parse_options(text: str, flag: str) -> dict:
    """``"a=1;b=x"`` → one set of keyword options (:func:`parse_grid` with one value each)."""
    options = parse_grid(text, flag)
    if len(options) != 1:
        raise SystemExit(f"{flag}: one value per option")
    return options[0]


def first_share(data: str, fmt: str, share: float):
    """(the log's first ``share`` by time, the item descriptions beside it): the user
    protocol's validation part; exits clearly where the log is absent."""
    from replay.loaders import load_items, load_log

    if not Path(data).exists():
        sys.exit(f"{data}: not found (the shared data folder is needed)")
    events = load_log(data, fmt)
    return events[:int(len(events) * share)], load_items(data, fmt)


def add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """:func:`add_validation_options` plus ``--protocol`` (session or user) and ``--share``
    (the user protocol's validation part): the serving pipeline's tuning benches."""
    add_validation_options(parser)
    parser.add_argument("--protocol", choices=("session", "user"), default="session")
    parser.add_argument("--share", type=float, default=0.6,
                        help="user protocol: validation is the log's first share (by time)")


def protocol_split(args: argparse.Namespace) -> tuple[list, list, list]:
    """(train, validation, item descriptions) for ``--protocol``: the user protocol's first
    ``--share`` of the log (learnt as it is scored, so no train part) or the session
    protocol's :func:`validation_split`."""
    if args.protocol == "user":
        valid, items = first_share(args.data, args.format, args.share)
        return [], valid, items
    train, valid = validation_split(args)
    return train, valid, []


def validation_split(args: argparse.Namespace):
    """(train, validation): the last ``--test-days`` of the training log (never the test
    split, which the tuning benches do not read)."""
    from replay.loaders import load_split

    return load_split(args.data, args.format, args.test_days)


def learn_events(models, events, batch: int) -> None:
    """Every model learns ``events`` in batches of ``batch``, each with its own signal mapper
    per batch, as a worker maps them."""
    from online_models.signals import SignalMapper

    for start in range(0, len(events), batch):
        for model in models:
            model.learn(SignalMapper().map(events[start:start + batch]))


def learn_live_state(settings: Settings, client, events, batch: int = 2000) -> None:
    """The live models' state (``STREAMREC_LIVE_MODELS``) in Redis, in the configured layout
    (``STREAMREC_STATE_WRITER``), as a worker leaves it after learning ``events``: under
    ``single`` the writer holds rows in memory and writes them out whole at the end."""
    from state.redis_store import build_on_redis

    models = build_on_redis(settings.live_model_names, client, settings.key_prefix,
                            layout=settings.state_writer, writer=True)
    learn_and_flush(models.values(), client, events, batch)


def learn_and_flush(models, client, events, batch: int = 2000) -> None:
    """:func:`learn_events`, then what the models' stores hold written out (a single
    writer's held state) in one transaction."""
    learn_events(models, events, batch)
    with client.pipeline(transaction=True) as pipe:
        for model in models:
            if hasattr(model.store, "flush"):
                model.store.flush(pipe)
        pipe.execute()


def simulated_serving_state(settings: Settings, client, users: int) -> list[str]:
    """What the serving benches draw on: ``20 × users`` simulated events of ``users`` users
    over 5,000 items in the last hour, applied (histories, trending) and learnt by the live
    models; returns the users."""
    import time

    from stream.simulator import UserSimulator
    from stream.state import LiveState

    events = list(UserSimulator(users, 5000, seed=1).events(20 * users, time.time() - 3600))
    LiveState(settings, client).apply_sync(events)
    learn_live_state(settings, client, events)
    return sorted({e.user_id for e in events})


def yoochoose_split():
    """(train, test) events of the shared YooChoose sample; exits clearly where it is absent."""
    from replay.loaders import load_split

    if not YOOCHOOSE.exists():
        sys.exit(f"{YOOCHOOSE} not found: this benchmark reads the team's shared data")
    return load_split(YOOCHOOSE, "yoochoose")


def bench_worker_env(kafka_bootstrap: str, redis_url: str, run_id: str, **settings) -> dict:
    """The environment of ``streamrec worker`` processes in a bench run: the run's topics
    (``bench-<run_id>``, ``bench-dlq-<run_id>``, ...), group and services, short group
    timeouts, and ``settings`` as ``STREAMREC_<NAME>`` variables."""
    return {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "STREAMREC_REDIS_URL": redis_url, "STREAMREC_APP_ID": f"bench-{run_id}",
            "STREAMREC_TOPIC_INTERACTIONS": f"bench-{run_id}",
            "STREAMREC_TOPIC_DLQ": f"bench-dlq-{run_id}",
            "STREAMREC_TOPIC_ITEM_VECTORS": f"bench-vectors-{run_id}",
            "STREAMREC_TOPIC_ITEM_DELTAS": f"bench-deltas-{run_id}",
            "STREAMREC_KAFKA_SESSION_TIMEOUT_S": "6",
            "STREAMREC_KAFKA_REBALANCE_TIMEOUT_S": "6",
            **{f"STREAMREC_{name.upper()}": str(value) for name, value in settings.items()}}


def spawn_worker(env: dict, data_dir: Path, log, **extra_env: str) -> subprocess.Popen:
    """A ``streamrec worker`` process (its own web port and data folder), output to ``log``."""
    from infra.embedded import free_port

    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "worker", "--loglevel", "warn"],
        env={**env, "STREAMREC_WORKER_WEB_PORT": str(free_port()),
             "STREAMREC_WORKER_DATA_DIR": str(data_dir), **extra_env},
        cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


def events_handled(client, keys) -> int:
    """Events the workers applied or dropped as producer duplicates (the simulator sends
    some), from Redis's counters."""
    return sum(int(c or 0) for c in client.hmget(keys.stats, "events_applied",
                                                  "skipped_duplicates"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_result(result: dict) -> None:
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
    print(json.dumps(result))
