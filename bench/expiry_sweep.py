"""The expiry sweep's cost in Redis: keys written without TTLs (by writers that expire them
themselves) get their tables' TTLs when a writer takes over or a worker group rebalances
(:func:`state.redis_store.give_untimed_keys_ttls`).

A redis-server of its own holds ``--keys`` string keys: 60 % in the tables of two model
namespaces that writers expire themselves (session: three tables, mf: two), 40 % others
(feeds, say). The sweep of both namespaces' stores is timed: wall, this process's CPU, and
Redis's own time in SCAN and PEXPIRE (``INFO commandstats``). Baseline in the same run: one
bare SCAN of the whole keyspace (``SCAN … COUNT 1000``, matching everything): each SCAN,
whatever it matches, walks every key. Usage: ``python bench/expiry_sweep.py [--keys 1000000]``.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import print_result  # noqa: E402
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from state.redis_store import RedisStore, give_untimed_keys_ttls  # noqa: E402

TABLES = {"session": ("sess", "isess", "rules"), "mf": ("user", "item")}


def fill(client, stores: list[RedisStore], keys: int) -> int:
    """Write the keyspace; returns how many keys are in the stores' tables."""
    tables = [(store, table) for store, names in zip(stores, TABLES.values())
              for table in names]
    per_table, written = int(0.6 * keys) // len(tables), 0
    with client.pipeline(transaction=False) as pipe:
        for store, table in tables:
            store.note_expiry({table: 100_000})
            for n in range(per_table):
                pipe.set(store.key(table, f"k{n}"), b"x" * 40)
                if len(pipe) >= 10_000:
                    pipe.execute()
            written += per_table
        for n in range(keys - written):
            pipe.set(f"sr:feed:{{u{n}}}", b"y" * 40)
            if len(pipe) >= 10_000:
                pipe.execute()
        pipe.execute()
    return written


def redis_seconds(client, command: str) -> float:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("usec", 0) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        client = sync_redis(server.url)
        stores = [RedisStore(client, "sr", namespace, local_ttl_s=100, shared_ttl_s=100,
                             rows_as_strings=True, expires_by_writer=True)
                  for namespace in TABLES]
        in_tables = fill(client, stores, args.keys)
        client.config_resetstat()
        started = time.perf_counter()
        walked = sum(1 for _ in client.scan_iter(count=1000))
        bare_wall, bare_redis = time.perf_counter() - started, redis_seconds(client, "scan")
        client.config_resetstat()
        started, cpu = time.perf_counter(), time.process_time()
        given = give_untimed_keys_ttls(stores)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        result = {
            "keys": walked, "keys_in_swept_tables": in_tables, "given_a_ttl": given,
            "sweep_wall_s": round(wall, 2), "sweep_client_cpu_s": round(cpu, 2),
            "sweep_redis_scan_s": round(redis_seconds(client, "scan"), 2),
            "sweep_redis_pexpire_s": round(redis_seconds(client, "pexpire"), 2),
            "baseline_bare_scan_wall_s": round(bare_wall, 2),
            "baseline_bare_scan_redis_s": round(bare_redis, 2),
        }
        result["sweep_scan_passes"] = round(result["sweep_redis_scan_s"] / bare_redis, 1)
        client.close()
    print_result(result)


if __name__ == "__main__":
    main()
