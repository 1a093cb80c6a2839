"""GRU4Rec: learns the order of items in sessions, trains in versions on its window."""

import numpy as np

from online_models.base import Query
from online_models.gru4rec import GRU4RecModel
from online_models.signals import SignalMapper
from schemas.events import Interaction


def _sessions(n_sessions: int, seed: int = 0) -> list[Interaction]:
    """Sessions walking one of 4 fixed chains of 5 items each: the next item is determined."""
    rng = np.random.default_rng(seed)
    chains = [[f"c{c}i{i}" for i in range(5)] for c in range(4)]
    events, ts = [], 1.7e9
    for s in range(n_sessions):
        chain = chains[int(rng.integers(4))]
        start = int(rng.integers(0, 2))
        for item in chain[start:]:
            ts += 1.0
            events.append(Interaction(event_id=f"e{len(events)}", user_id=f"u{s}", item_id=item,
                                      type="click", timestamp=ts, session_id=f"s{s}"))
    return events


def _small(**overrides) -> GRU4RecModel:
    settings = dict(hidden=32, epochs=3, n_sample=8, batch_sessions=8, retrain_every=400,
                    min_examples=200, learning_rate=0.1)
    return GRU4RecModel(**(settings | overrides))


def test_learns_what_comes_next_in_a_session():
    model, mapper = _small(), SignalMapper()
    events = _sessions(300)
    for start in range(0, len(events), 100):
        model.learn(mapper.map(events[start:start + 100]))
    [after_1, after_3] = model.recommend([Query("x", ("c2i0", "c2i1")),
                                          Query("y", ("c3i1", "c3i2", "c3i3"))], k=3)
    assert after_1.items[0] == "c2i2" and after_3.items[0] == "c3i4"
    assert np.all(np.diff(after_1.scores) <= 0)


def test_versions_follow_the_schedule_and_an_unknown_prefix_gets_nothing():
    model, mapper = _small(), SignalMapper()
    events = _sessions(200)  # ~900 clicks: versions past 200 and 600 (1,000 not reached)
    assert model.version == 0 and model.recommend([Query("a", ("c0i0",))], 3)[0].items == []
    for start in range(0, len(events), 50):
        model.learn(mapper.map(events[start:start + 50]))
    assert model.version == 2
    assert model.recommend([Query("a", ("never-seen",))], 3)[0].items == []


def test_window_and_sessions_stay_bounded():
    model, mapper = _small(window=300, max_session_items=20, min_examples=10**9), SignalMapper()
    flood = [Interaction(event_id=str(n), user_id="a", item_id=f"x{n}", type="click",
                         timestamp=1.7e9 + n, session_id="one") for n in range(1000)]
    model.learn(mapper.map(flood))
    model.learn(mapper.map(_sessions(200)))
    assert model._events <= 300
    assert all(len(items) <= 20 for items in model._sessions.values())
