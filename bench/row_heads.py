"""What serving would lose if the read model held only each row's head (the state-redesign
issue: the single writer re-encodes whole rows, so its cost grows as rows fill).

Replays the shared YooChoose sample with the session protocol, the models' rows read through
a store that returns only the ``K`` largest members of each shared row (rules, neighbours,
each item's recent sessions; learning is unchanged), and reports HR@20 and MRR@20 per ``K``
beside the full rows, with the bytes a whole-row read model writes per row against a head.
Usage: ``python bench/row_heads.py [--heads 20,50,100]``
"""

from __future__ import annotations

import argparse
import heapq
import sys
from operator import itemgetter
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_result, yoochoose_split  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from online_models.store import MemoryStore  # noqa: E402
from replay.protocols import run  # noqa: E402

SHARED_ROWS = {"session": ("sr", "isess"), "cooc": ("cooc",)}


def head(row: dict[str, float], k: int) -> dict[str, float]:
    """The row's ``k`` largest members (the whole row when it is no longer)."""
    return row if len(row) <= k else dict(heapq.nlargest(k, row.items(), key=itemgetter(1)))


class ChangeTracking(MemoryStore):
    """A memory store that remembers which rows of ``tables`` each batch changed."""

    def __init__(self, tables: tuple[str, ...]) -> None:
        super().__init__()
        self.tables, self.changed = tables, {}

    def incr_flat_rows(self, table, rows, keep_top=None):
        super().incr_flat_rows(table, rows, keep_top)
        self.changed.setdefault(table, set()).update(rows.keys)

    def set_flat_rows(self, table, rows, keep_top=None):
        super().set_flat_rows(table, rows, keep_top)
        self.changed.setdefault(table, set()).update(rows.keys)

    def take_changed(self) -> dict[str, set[str]]:
        changed = {t: keys for t, keys in self.changed.items() if t in self.tables}
        self.changed = {}
        return changed


class HeadReads(MemoryStore):
    """A memory store whose reads of ``tables`` return each row's ``k`` largest members."""

    def __init__(self, k: int, tables: tuple[str, ...]) -> None:
        super().__init__()
        self.k, self.tables = k, tables

    def get_rows(self, table, keys):
        rows = super().get_rows(table, keys)
        if table not in self.tables:
            return rows
        return [head(row, self.k) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", default="20,50,100")
    args = parser.parse_args()
    train, test = yoochoose_split()
    encode = msgspec.msgpack.encode
    result = {}
    for k in [None, *map(int, args.heads.split(","))]:
        def store(name, k=k):
            return MemoryStore() if k is None else HeadReads(k, SHARED_ROWS[name])
        for r in run("session", train, test, list(SHARED_ROWS), store_factory=store,
                     progress=False):
            if r.name in SHARED_ROWS:
                label = f"{r.name}_{'full' if k is None else f'head{k}'}"
                result[f"{label}_HR@20"] = round(r.metrics["HR@20"], 4)
                result[f"{label}_MRR@20"] = round(r.metrics["MRR@20"], 4)
    # what a whole-row read model writes per event (each row changed in a batch of 1,000,
    # written once after it) against heads of K members
    heads = list(map(int, args.heads.split(",")))
    events = train + test
    for name, tables in SHARED_ROWS.items():
        model, mapper = build(name).bind(ChangeTracking(tables)), SignalMapper()
        written = {"whole": 0, **{k: 0 for k in heads}}
        for start in range(0, len(events), 1000):
            model.learn(mapper.map(events[start:start + 1000]))
            for table, keys in model.store.take_changed().items():
                for row in model.store.get_rows(table, sorted(keys)):
                    written["whole"] += len(encode(row))
                    for k in heads:
                        written[k] += len(encode(head(row, k)))
        result[f"{name}_bytes_per_event_whole_rows"] = round(written["whole"] / len(events))
        for k in heads:
            result[f"{name}_bytes_per_event_head{k}"] = round(written[k] / len(events))
    print_result(result)


if __name__ == "__main__":
    main()
