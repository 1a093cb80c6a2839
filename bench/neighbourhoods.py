"""The feed builder's neighbourhood rounds while events arrive: CPU per round and items counted,
with the sample check (``STREAMREC_NEIGHBOURHOODS_RECOUNT_S``: an item whose recent sessions
did not change keeps its published neighbourhood) and without it (0: every wanted item counted
each round, the baseline), in the same run.

State as ``bench/api.py`` builds it (``20 × --users`` simulated events over 5,000 items,
learnt by the live models); lists for every user mark the items serving asks for. Then
``--rounds`` times: ``--events-per-round`` more simulated events (the ingest of one 1 s
interval at that rate) are applied and learnt, and each publisher runs one round, in turn.
Per publisher: CPU ms per round, items counted per round. Usage:
``python bench/neighbourhoods.py [--users 2000] [--events-per-round 1000 5000] [--rounds 10]``.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import learn_and_flush, print_result, simulated_serving_state  # noqa: E402
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--events-per-round", type=int, nargs="+", default=[0, 1000, 5000])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from serving.feeds import FeedBuilder
    from serving.neighbour_rows import NeighbourhoodPublisher
    from state.redis_store import build_on_redis
    from stream.simulator import UserSimulator
    from stream.state import LiveState

    result: dict = {"users": args.users, "rounds": args.rounds}
    with EmbeddedRedis() as redis_srv:
        settings = Settings(redis_url=redis_srv.url)
        client = sync_redis(redis_srv.url)
        users = simulated_serving_state(settings, client, args.users)
        FeedBuilder(settings, client).compute(users, 20, source="on_demand")  # wanted
        models = build_on_redis(settings.live_model_names, client, settings.key_prefix,
                                layout=settings.state_writer, writer=True)
        live = LiveState(settings, client)
        arriving = UserSimulator(args.users, 5000, seed=2).events(
            args.rounds * sum(args.events_per_round), time.time())
        publishers = {name: NeighbourhoodPublisher.for_settings(settings.model_copy(
            update={"neighbourhoods_recount_s": recount_s}), client)
            for name, recount_s in (("checked", settings.neighbourhoods_recount_s),
                                    ("baseline", 0.0))}
        for publisher in publishers.values():
            result["wanted"] = publisher.publish()  # each one's first round counts all
        for rate in args.events_per_round:
            cpu_ms = {name: [] for name in publishers}
            counted = {name: [] for name in publishers}
            for _ in range(args.rounds):
                events = [next(arriving) for _ in range(rate)]
                if events:
                    live.apply_sync(events)
                    learn_and_flush(models.values(), client, events)
                for name, publisher in publishers.items():
                    cpu = time.process_time()
                    publisher.publish()
                    cpu_ms[name].append(1000 * (time.process_time() - cpu))
                    counted[name].append(publisher.counted)
            for name in publishers:
                result[f"{name}_{rate}_cpu_ms_per_round"] = round(float(np.median(
                    cpu_ms[name])), 1)
                result[f"{name}_{rate}_counted_per_round"] = round(float(np.mean(
                    counted[name])), 1)
    print_result(result)


if __name__ == "__main__":
    main()
