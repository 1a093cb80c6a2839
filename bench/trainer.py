"""Nearline end to end: a newly described item → its vector retrievable in serving's index.

An embedded broker; simulated traffic at ``--rate`` events/s; every ``--new-every`` seconds a
brand-new item is described (categories of an existing one, never clicked). The trainer
(``stream/trainer.py``, two-tower, a version every ``--retrain-every`` positives, by default
the model's) consumes it all; serving's ``ann_two_tower`` source (``serving/nearline.py``)
checks CURRENT every 0.5 s. Measured per new item: description sent → the item found in the
serving index; and per version: the interval between versions and the time to save + publish
one. The baseline in the same run is the publish interval itself: a latency at or under one
interval (+ one training) is the design's best.
Usage: ``python bench/trainer.py``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from infra.embedded import EmbeddedKafka, ensure_streamrec_topics  # noqa: E402
from infra.settings import Settings  # noqa: E402
from online_models.two_tower import TwoTowerModel  # noqa: E402
from schemas.items import ItemRecord  # noqa: E402
from serving.nearline import NearlineSource  # noqa: E402
from stream.producer import InteractionProducer, ItemPublisher  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402
from stream.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--retrain-every", type=int, default=None,
                        help="positives per version (default: the model's)")
    parser.add_argument("--new-every", type=float, default=5.0, help="seconds between new items")
    args = parser.parse_args()
    with EmbeddedKafka() as kafka, tempfile.TemporaryDirectory() as folder:
        settings = Settings(kafka_bootstrap=kafka.bootstrap, redis_url="redis://unused",
                            trainer_dir=folder, topic_partitions=4)
        ensure_streamrec_topics(settings)
        sim = UserSimulator(2000, 3000, seed=1)
        descriptions = sim.item_descriptions(time.time() - 3600)
        with ItemPublisher(settings.kafka_bootstrap, settings.topic_items) as publisher:
            publisher.send_many(descriptions)
            publisher.flush()
        trainer = Trainer(settings, "two_tower",
                          model=TwoTowerModel(**({"retrain_every": args.retrain_every}
                                                 if args.retrain_every else {})))
        stop = threading.Event()
        training = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
        training.start()
        source = NearlineSource(folder, check_s=0.5)
        sent: dict[str, float] = {}
        found: dict[str, float] = {}
        versions: list[tuple[float, int]] = []
        started = time.time()
        events = sim.events(10**9, started - 1, events_per_s=args.rate)
        with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions) as producer, \
                ItemPublisher(settings.kafka_bootstrap, settings.topic_items) as publisher:
            next_new, tick = started, 0.1
            while time.time() - started < args.seconds:
                producer.send_many([next(events) for _ in range(int(args.rate * tick))])
                now = time.time()
                if now >= next_new:
                    like = descriptions[len(sent) % len(descriptions)]
                    item = f"new-{len(sent)}"
                    publisher.send_many([ItemRecord(item_id=item, timestamp=now,
                                                    categories=list(like.categories),
                                                    tags=list(like.tags), title=item)])
                    publisher.flush()
                    sent[item] = time.time()
                    next_new += args.new_every
                source.refresh()
                if source.version is not None and (not versions
                                                   or versions[-1][1] != source.version):
                    versions.append((time.time(), source.version))
                    waiting = [i for i in sent if i not in found]
                    if waiting:
                        _, hit = source._index.vectors(waiting)
                        for item, ok in zip(waiting, hit.tolist()):
                            if ok:
                                found[item] = time.time()
                time.sleep(max(0.0, tick - (time.time() - now)))
            producer.flush()
        stop.set()
        training.join(60)
        trainer.close()
        source.close()
    latencies = [found[i] - sent[i] for i in found]
    intervals = np.diff([t for t, _ in versions]).tolist()
    result = {"seconds": args.seconds, "rate": args.rate,
              "retrain_every": trainer.model.schedule.every,
              "versions": len(versions), "events_learned": trainer.events,
              "new_items_sent": len(sent), "new_items_found": len(found),
              "version_interval_s_p50": round(float(np.median(intervals)), 2) if intervals else None,
              "new_item_to_serving_s_p50": round(float(np.percentile(latencies, 50)), 2)
              if latencies else None,
              "new_item_to_serving_s_p99": round(float(np.percentile(latencies, 99)), 2)
              if latencies else None,
              "new_item_to_serving_s_max": round(max(latencies), 2) if latencies else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
