"""What item ownership's delta records cost (state/ownership.py, docs/item-ownership.md).

The live default models (session + MF) learn the shared YooChoose sample's training events
in chunks of ``--chunk``, two ways, in turn for ``--rounds`` rounds:

* **direct** (baseline): into one memory store, as replay does;
* **owned**: through delta recorders; each chunk's records are encoded per owner partition
  (``--partitions``), decoded and applied by their owners' memory stores before the next
  chunk, as an owner agent would apply them from the item-keyed topic.

Both end with the same state (checked: every row and vector equal). Reports events/s and µs
of CPU per event for each, the difference (what recording, encoding, decoding and applying
cost), and the records' size: operations and bytes per chunk and per event. No broker and no
Redis: the hop's produce and consume and the owners' flushes come on top. ``--redis``: the
last round's records are then applied by live owners (``state.owner_commits.OwnerPartition``,
as the agent applies what the relay sent) on a redis-server of their own, committing every
``--commit-every`` chunks, each owner on its own (the baseline) and all together in one
transaction (as the agent does), in turn for ``--rounds`` rounds: their CPU and wall time per
event (what the owners' agent spends, the broker aside). Usage:
``python bench/item_deltas.py [--chunk 1000] [--partitions 8] [--redis]``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_result, yoochoose_split  # noqa: E402
from online_models.kernels import warm_up  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from online_models.store import MemoryStore  # noqa: E402
from state.ownership import OwnedLayout, held_state  # noqa: E402

MODELS = ("session", "mf")


def direct(chunks) -> tuple[float, dict]:
    models = {name: build(name).bind(MemoryStore()) for name in MODELS}
    cpu = time.process_time()
    for signals in chunks:
        for model in models.values():
            model.learn(signals)
    return time.process_time() - cpu, {name: [m.store] for name, m in models.items()}


def owned(chunks, partitions: int) -> tuple[float, dict, dict, list[dict[int, bytes]]]:
    layout = OwnedLayout({name: build(name) for name in MODELS}, partitions)
    cpu = time.process_time()
    records = [layout.learn(signals) for signals in chunks]
    spent = time.process_time() - cpu
    return spent, {name: layout.stores(name) for name in MODELS}, layout.sizes, records


def owners_on_redis(records: list[dict[int, bytes]], partitions: int, commit_every: int,
                    together: bool) -> tuple[float, float]:
    """Apply the records as the owners' agent does (``apply_sent``, the chunks' outbox
    entries written first, as the workers' commits would), on a redis-server of their own,
    committing every ``commit_every`` chunks each owner on its own or all ``together`` in one
    transaction: (CPU s, wall s)."""
    from infra.embedded import EmbeddedRedis
    from infra.redis_client import sync_redis
    from infra.settings import Settings
    from schemas.keys import RedisKeys
    from state.owner_commits import OwnerPartition, commit_owners, owner_stores

    with EmbeddedRedis() as server:
        client = sync_redis(server.url)
        s = Settings(redis_url=server.url, state_writer="owned", key_prefix="bench",
                     live_models=",".join(MODELS))
        keys = RedisKeys(s.key_prefix)
        client.set(keys.owned_epoch, b"bench")
        for number, chunk in enumerate(records, 1):  # replay records cover offset ``number``
            client.hset(keys.outbox("replay", 0),
                        mapping={f"{number}:{p}": record for p, record in chunk.items()})
        owners = [OwnerPartition(client, s.key_prefix, p, owner_stores(s, client))
                  for p in range(partitions)]
        cpu, wall = time.process_time(), time.perf_counter()
        for number, chunk in enumerate(records, 1):
            for partition, record in chunk.items():
                owners[partition].apply_sent([b"bench"], [record], [number], checked=False)
            if number % commit_every == 0 or number == len(records):
                if together:
                    commit_owners(owners)
                else:
                    for owner in owners:
                        owner.commit()
        spent = time.process_time() - cpu, time.perf_counter() - wall
        if client.hlen(keys.outbox("replay", 0)):
            sys.exit("owners left outbox entries behind")
        client.close()
    return spent


def same_state(a: dict, b: dict) -> bool:
    """Every model's rows and vectors, held across its stores, equal bit for bit."""
    return all(held_state(a[name]) == held_state(b[name]) for name in MODELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=1000, help="events per chunk")
    parser.add_argument("--partitions", type=int, default=8, help="owner partitions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", action="store_true",
                        help="also apply the records with live owners on a redis-server")
    parser.add_argument("--commit-every", type=int, default=4,
                        help="--redis: chunks between an owner's commits")
    args = parser.parse_args()
    warm_up()
    train, _ = yoochoose_split()
    mapper = SignalMapper()
    chunks = [mapper.map(train[n:n + args.chunk]) for n in range(0, len(train), args.chunk)]
    events = len(train)
    result: dict = {"events": events, "chunk": args.chunk, "partitions": args.partitions}
    for n in range(1, args.rounds + 1):
        base_s, base_state = direct(chunks)
        owned_s, owned_state, sizes, records = owned(chunks, args.partitions)
        if not same_state(base_state, owned_state):
            sys.exit("the owned layout's state differs from direct learning's")
        result.update({
            f"direct_{n}_events_per_s": round(events / base_s),
            f"direct_{n}_us_per_event": round(1e6 * base_s / events, 2),
            f"owned_{n}_events_per_s": round(events / owned_s),
            f"owned_{n}_us_per_event": round(1e6 * owned_s / events, 2),
            f"records_{n}_us_per_event": round(1e6 * (owned_s - base_s) / events, 2)})
    result.update({"records_per_chunk": round(sizes["records"] / len(chunks), 2),
                   "operations_per_chunk": round(sizes["operations"] / len(chunks), 1),
                   "record_bytes_per_event": round(sizes["bytes"] / events, 1)})
    for _ in range(args.rounds if args.redis else 0):  # in turn: same minutes, same machine
        for mode, together in (("one_by_one", False), ("together", True)):
            cpu_s, wall_s = owners_on_redis(records, args.partitions, args.commit_every,
                                            together)
            result.setdefault(f"owners_{mode}_cpu_us_per_event", []).append(
                round(1e6 * cpu_s / events, 2))
            result.setdefault(f"owners_{mode}_wall_us_per_event", []).append(
                round(1e6 * wall_s / events, 2))
    print_result(result)


if __name__ == "__main__":
    main()
