"""Nearline model speed: training throughput per device, time to the first version, and one
request's inference latency on one core beside a baseline model's (all in the same run).

``--model two_tower`` learns the first ``--share`` of MovieLens latest-small (with the item
descriptions beside it); baseline: ALS's fold-in on the same users. ``--model gru4rec`` (or
``sasrec``) learns the YooChoose 100k training file; baseline: the session-kNN model on the
same session prefixes. Where the model fine-tunes versions (``--set finetune_every=N``), their
times are reported too.
Per device of ``--devices`` (cpu, cuda, ...) a fresh model learns the log in chunks of 1,000
events as the replay does (versions trained on that device as their schedule falls due: time
to the first version and the whole pass), then the last version's training is timed alone.
Versions are served on the CPU whatever trained them, so requests are timed once, one by one
with ``torch.set_num_threads(1)``. Usage: ``python bench/nearline.py --model gru4rec
--devices cpu,cuda [--set batch_sessions=256]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import parse_options  # noqa: E402
from online_models.base import Query, torch_device  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from replay.loaders import load_items, load_log  # noqa: E402

SETUPS = {  # model → (default data, format, baseline model for requests)
    "two_tower": ("../shared/data/movielens-latest-small", "movielens", "als"),
    "gru4rec": ("../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt",
                "yoochoose", "session"),
    "sasrec": ("../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt",
               "yoochoose", "session"),
}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def learn(model, events, items, chunk: int = 1000) -> dict:
    """Feed the log in chunks (versions train as they fall due); the pass's timings."""
    mapper = SignalMapper()
    if items and hasattr(model, "learn_items"):
        model.learn_items(items)
    first_version_s = None
    finetunes: list[float] = []
    if getattr(model, "schedule", None) is not None and model.schedule.tune_every:
        untimed = model.finetune

        def timed_finetune() -> None:
            t = time.perf_counter()
            untimed()
            finetunes.append(time.perf_counter() - t)
        model.finetune = timed_finetune
    started = time.perf_counter()
    for start in range(0, len(events), chunk):
        model.learn(mapper.map(events[start:start + chunk]))
        if first_version_s is None and getattr(model, "version", 0):
            first_version_s = time.perf_counter() - started
    figures = {"pass_seconds": round(time.perf_counter() - started, 2),
               "versions": getattr(model, "version", 0),
               "first_version_after_s": round(first_version_s or 0.0, 2)}
    if finetunes:
        figures["finetuned_versions"] = len(finetunes)
        figures["finetune_seconds"] = {"p50": round(float(np.median(finetunes)), 3),
                                       "max": round(max(finetunes), 3)}
    return figures


def timed_training(model) -> dict:
    """The last version's training alone (one more version on the same window)."""
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.train()
    seconds = time.perf_counter() - started
    examples = model.examples_held
    return {"window_examples": examples, "epochs": model.epochs,
            "train_seconds": round(seconds, 2),
            "train_examples_per_s": round(examples * model.epochs / seconds)}


def queries_for(model_name: str, events, n: int) -> list[Query]:
    rng = np.random.default_rng(0)
    if model_name == "two_tower":
        users = sorted({e.user_id for e in events})
        return [Query(str(u)) for u in rng.choice(users, n)]
    sessions: dict[str, list[str]] = {}
    for e in events:
        sessions.setdefault(e.session_id or e.user_id, []).append(e.item_id)
    picked = rng.choice(sorted(s for s, items in sessions.items() if len(items) >= 2), n)
    out = []
    for s in picked:
        items = sessions[s]
        cut = int(rng.integers(1, len(items)))
        out.append(Query(s, tuple(items[:cut])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="two_tower")
    parser.add_argument("--devices", default="cpu",
                        help="comma-separated: cpu, cuda, cuda:N, auto")
    parser.add_argument("--data", default=None, help="default: the model's log (module doc)")
    parser.add_argument("--share", type=float, default=None,
                        help="first share of the log learned (default: 0.6 of MovieLens, all "
                             "of the YooChoose training file)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a model option (repeatable), e.g. --set batch_sessions=256")
    args = parser.parse_args()
    options = parse_options(";".join(args.set), "--set")
    default_data, fmt, baseline_name = SETUPS[args.model]
    data = args.data or default_data
    if not Path(data).exists():
        sys.exit(f"{data}: not found (the shared data folder is needed)")
    devices = [d for d in args.devices.split(",") if d]
    for device in devices:
        try:
            torch_device(device)
        except ValueError as exc:
            sys.exit(f"--devices: {exc}")
    events = load_log(data, fmt)
    share = args.share if args.share is not None else (0.6 if args.model == "two_tower" else 1.0)
    events = events[:int(len(events) * share)]
    items = load_items(data, fmt)
    result: dict = {"model": args.model, "events": len(events), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "options": options, "devices": {}}
    model = None
    for device in devices:
        try:
            model = build(args.model, device=device, **options)
        except TypeError as exc:
            sys.exit(f"--set: {exc}")
        figures = learn(model, events, items)
        figures.update(timed_training(model))
        if device.startswith("cuda"):
            figures["gpu"] = torch.cuda.get_device_name(torch_device(device))
        result["devices"][device] = figures
        print(json.dumps({device: figures}), flush=True)
    baseline = build(baseline_name)
    learn(baseline, events, items)
    torch.set_num_threads(1)
    timings: dict[str, list[float]] = {args.model: [], baseline_name: []}
    for query in queries_for(args.model, events, args.requests):
        for name, m in ((args.model, model), (baseline_name, baseline)):
            t = time.perf_counter()
            m.recommend([query], 100)
            timings[name].append(time.perf_counter() - t)
    result["one_request_one_core"] = {name: percentiles(t) for name, t in timings.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
