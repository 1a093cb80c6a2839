"""What the benchmarks share: the live-path options, and how every benchmark ends — one
aligned ``name: value`` line per figure, then the same figures as one JSON line (the last line
of output, for machines)."""

from __future__ import annotations

import argparse
import json


def add_live_options(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--redis-aof``, for the benches that run the worker's apply path."""
    parser.add_argument("--models", default="session,cooc,mf")
    parser.add_argument("--redis-aof", action="store_true",
                        help="run redis-server with AOF (everysec), as infra/redis.conf does")


def print_result(result: dict) -> None:
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
    print(json.dumps(result))
