"""Replay speed and memory of the online models, beside river's BiasedMF on the same events.

Reads the shared YooChoose sample (train_full then test, 83,846 events), maps signals once,
and times ``learn`` over batches of ``--batch`` events per model; session + cooc + mf
together; session + mf together (what the live default learns: co-occurrence is read at query
time from the session model's state, ``cooc_read``); session + co-occurrence + trending with
the mapping included, as a worker would run them;
and ``river.reco.BiasedMF.learn_one`` over the same events. Then times the session model's
predictions for the 10,152 next-item queries of the test split, and measures memory per item
and per user (tracemalloc, memory store). Prediction speed is the median of three timed calls
after a warm-up. The last line is JSON.
Usage: ``python bench/replay.py [--batch 1000]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import yoochoose_split  # noqa: E402
from online_models import kernels  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from replay.protocols import session_queries  # noqa: E402

def learn_rate(names, batches, raw_batches=None, mapper=None) -> tuple[float, float]:
    """(events/s, CPU µs per event): the CPU time holds steadier than the wall clock where
    the machine is shared (compare runs by it)."""
    models = [build(n) for n in names]
    start, cpu = time.perf_counter(), time.process_time()
    for n, batch in enumerate(batches):
        if mapper is not None:
            batch = mapper.map(raw_batches[n])
        for model in models:
            model.learn(batch)
    events = sum(len(b) for b in batches)
    return (events / (time.perf_counter() - start),
            1e6 * (time.process_time() - cpu) / events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    kernels.warm_up()  # the compiled loops load once per process, as in a worker
    train, test = yoochoose_split()
    events = train + test
    raw = [events[i:i + args.batch] for i in range(0, len(events), args.batch)]
    start = time.perf_counter()
    mapper = SignalMapper()
    batches = [mapper.map(b) for b in raw]
    results = {"events": len(events), "batch": args.batch,
               "signal_mapping_events_per_s": len(events) / (time.perf_counter() - start)}
    for name in ("session", "cooc", "trending", "mf", "popularity"):
        results[f"{name}_events_per_s"], results[f"{name}_cpu_us_per_event"] = learn_rate(
            [name], batches)
    results["session_cooc_mf_events_per_s"], results["session_cooc_mf_cpu_us_per_event"] = \
        learn_rate(["session", "cooc", "mf"], batches)
    # the live default: co-occurrence is read from the session model's state, not learnt
    results["session_mf_events_per_s"], results["session_mf_cpu_us_per_event"] = \
        learn_rate(["session", "mf"], batches)
    results["live_three_with_mapping_events_per_s"] = learn_rate(
        ["session", "cooc", "trending"], batches, raw, SignalMapper())[0]
    river = build("river_mf")
    start = time.perf_counter()
    for batch in batches:
        river.learn(batch)
    results["river_biasedmf_events_per_s"] = len(events) / (time.perf_counter() - start)
    results["mf_vs_river_ratio"] = results["mf_events_per_s"] / \
        results["river_biasedmf_events_per_s"]

    session = build("session")
    for batch in batches[: (len(train) + args.batch - 1) // args.batch]:
        session.learn(batch)
    queries = [p.query for p in session_queries(test)]
    session.recommend(queries[:100], 20)  # warm-up: thread pool, imports
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        session.recommend(queries, 20)
        rates.append(len(queries) / (time.perf_counter() - start))
    results["session_predictions_per_s"] = sorted(rates)[1]  # median of three
    results["session_predictions_per_s_min"] = min(rates)

    n_items = len({e.item_id for e in events})
    n_users = len({e.user_id for e in events})
    for name in ("session", "cooc", "mf"):
        tracemalloc.start()
        model = build(name)
        for batch in batches:
            model.learn(batch)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[f"{name}_state_bytes"] = current
        results[f"{name}_bytes_per_item"] = current / n_items
        results[f"{name}_bytes_per_user"] = current / n_users
        del model
    results["items"], results["users"] = n_items, n_users
    for key, value in results.items():
        print(f"{key:>40}: {value:,.1f}" if isinstance(value, float) else f"{key:>40}: {value}")
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
