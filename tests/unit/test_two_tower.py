"""The two-tower model: trains in versions on its window, and its item tower gives a described
item nobody touched a vector close to its kind."""

import numpy as np

from online_models.base import Query
from online_models.signals import SignalMapper
from online_models.two_tower import TwoTowerModel
from schemas.events import Interaction
from schemas.items import ItemRecord

T = 1.7e9


def two_camps(rounds: int = 6):
    """Users a0..a19 like only items A0..A14, users b0..b19 only B0..B14."""
    rng = np.random.default_rng(0)
    events = []
    for r in range(rounds):
        for camp in "ab":
            for u in range(20):
                item = f"{camp.upper()}{rng.integers(15)}"
                events.append(Interaction(event_id=f"{r}-{camp}{u}", user_id=f"{camp}{u}",
                                          item_id=item, type="like",
                                          timestamp=T + len(events)))
    return events


def described(camp: str, item: str) -> ItemRecord:
    return ItemRecord(item_id=item, timestamp=T, categories=[f"kind-{camp}"])


def trained(**options) -> TwoTowerModel:
    model = TwoTowerModel(dim=16, min_examples=100, retrain_every=120, epochs=15,
                          batch_size=64, **options)
    model.learn_items([described(c, f"{c.upper()}{n}") for c in "ab" for n in range(15)]
                      + [described("a", "NEW-A"), described("b", "NEW-B")])
    mapper = SignalMapper()
    events = two_camps()
    for start in range(0, len(events), 40):
        model.learn(mapper.map(events[start:start + 40]))
    return model


def test_versions_follow_the_schedule_and_queries_use_the_last_one():
    model = trained()
    assert model.version == 2  # 240 positives: first at 120 (past 100 examples), then at 240
    [rec] = model.recommend([Query("a0")], k=5)
    assert len(rec.items) == 5 and all(i.startswith(("A", "NEW-A")) for i in rec.items[:3])


def test_a_described_item_nobody_touched_ranks_with_its_kind():
    model = trained()
    [rec] = model.recommend([Query("a1")], k=40)
    ranked = rec.items
    assert ranked.index("NEW-A") < ranked.index("NEW-B")
    assert ranked.index("NEW-A") < min(ranked.index(f"B{n}") for n in range(15))


def test_no_version_before_enough_examples():
    model = TwoTowerModel(min_examples=10_000)
    model.learn(SignalMapper().map(two_camps(1)))
    assert model.version == 0 and model.recommend([Query("a0")], k=5)[0].items == []
