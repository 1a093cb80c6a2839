"""The sequential models (GRU4Rec, SASRec): learn the order of items in sessions, train in
versions on their window, save and load versions."""

import numpy as np
import pytest
import torch

from online_models.base import Query, RetrainSchedule
from online_models.gru4rec import GRU4RecModel
from online_models.sasrec import SASRecModel
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


#: each model at a small size, its learning rate for its optimiser (Adagrad, Adam)
SMALL = {GRU4RecModel: dict(learning_rate=0.1), SASRecModel: dict(learning_rate=0.01)}


@pytest.fixture(params=list(SMALL), ids=lambda model: model.name)
def small(request):
    def build(**overrides):
        settings = dict(hidden=32, epochs=3, n_sample=8, batch_sessions=8, retrain_every=400,
                        min_examples=200, **SMALL[request.param])
        return request.param(**(settings | overrides))
    return build


@pytest.mark.parametrize("full_softmax", [False, True], ids=["sampled", "full-softmax"])
def test_learns_what_comes_next_in_a_session(small, full_softmax):
    model, mapper = small(full_softmax=full_softmax), SignalMapper()
    events = _sessions(300)
    for start in range(0, len(events), 100):
        model.learn(mapper.map(events[start:start + 100]))
    [after_1, after_3] = model.recommend([Query("x", ("c2i0", "c2i1")),
                                          Query("y", ("c3i1", "c3i2", "c3i3"))], k=3)
    assert after_1.items[0] == "c2i2" and after_3.items[0] == "c3i4"
    assert np.all(np.diff(after_1.scores) <= 0)


@pytest.mark.parametrize("max_items, sampled", [(20, False), (19, True)])
def test_a_window_past_the_full_softmax_bound_trains_on_sampled_negatives(small, monkeypatch,
                                                                          max_items, sampled):
    calls = []
    sampled_loss = GRU4RecModel._sampled_loss
    monkeypatch.setattr(GRU4RecModel, "_sampled_loss",
                        lambda *args: calls.append(1) or sampled_loss(*args))
    model, mapper = small(full_softmax_max_items=max_items), SignalMapper()
    events = _sessions(100)  # the window holds all 20 items
    model.learn(mapper.map(events))
    assert model.version == 1 and bool(calls) is sampled
    assert model.recommend([Query("x", ("c2i0", "c2i1"))], k=3)[0].items


def test_versions_follow_the_schedule_and_an_unknown_prefix_gets_nothing(small):
    model, mapper = small(), SignalMapper()
    events = _sessions(200)  # ~900 clicks: versions past 200 and 600 (1,000 not reached)
    assert model.version == 0 and model.recommend([Query("a", ("c0i0",))], 3)[0].items == []
    for start in range(0, len(events), 50):
        model.learn(mapper.map(events[start:start + 50]))
    assert model.version == 2
    assert model.recommend([Query("a", ("never-seen",))], 3)[0].items == []


def test_fine_tunes_fall_between_full_versions_and_never_before_the_first():
    schedule = RetrainSchedule(every=10, min_examples=5, tune_every=3)
    schedule.add(4)
    assert not schedule.tune_due() and not schedule.due(held=4)
    assert schedule.due(held=5)
    schedule.published()
    schedule.add(3)
    assert schedule.tune_due() and not schedule.due(held=100)
    schedule.tuned()
    assert schedule.version == 2 and not schedule.tune_due()
    schedule.add(7)  # 10 since the full version: the next is full, and it resets both
    assert schedule.due(held=100) and schedule.tune_due()
    schedule.published()
    assert (schedule.since, schedule.since_tune) == (0, 0)
    schedule.add(3)
    schedule.paused = True  # a trainer rebuilding its window trains nothing
    assert not schedule.tune_due() and not schedule.due(held=100)


def test_fine_tuned_versions_learn_new_items_between_full_versions(small):
    """Between full versions (every 10**9 here), every ``finetune_every`` clicks the last
    version is fine-tuned on the sessions since: a chain of items never seen before becomes
    what comes next, and the items known before keep their place in the version."""
    model, mapper = small(retrain_every=10**9, finetune_every=100, finetune_epochs=4), \
        SignalMapper()
    events = _sessions(100)
    for start in range(0, len(events), 100):
        model.learn(mapper.map(events[start:start + 100]))
    first_items = model.export_version()[2]
    assert model.version >= 1 and "n0" not in first_items
    full_versions = model.version
    new_chain = [Interaction(event_id=f"n{s}-{i}", user_id=f"n{s}", item_id=f"n{i}", type="click",
                             timestamp=1.71e9 + 10 * s + i, session_id=f"n{s}")
                 for s in range(150) for i in range(4)]
    for start in range(0, len(new_chain), 100):
        model.learn(mapper.map(new_chain[start:start + 100]))
    assert model.version == full_versions + 6  # 600 clicks, one fine-tune per 100
    items = model.export_version()[2]
    assert items[:len(first_items)] == first_items and {"n0", "n3"} <= set(items)
    [after] = model.recommend([Query("x", ("n0", "n1"))], k=3)
    assert after.items[0] == "n2"


def test_window_and_sessions_stay_bounded(small):
    model, mapper = small(window=300, max_session_items=20, min_examples=10**9), SignalMapper()
    flood = [Interaction(event_id=str(n), user_id="a", item_id=f"x{n}", type="click",
                         timestamp=1.7e9 + n, session_id="one") for n in range(1000)]
    model.learn(mapper.map(flood))
    model.learn(mapper.map(_sessions(200)))
    assert model._events <= 300
    assert all(len(items) <= 20 for items in model._sessions.values())


def test_a_saved_version_loads_weights_only_and_answers_alike(small, tmp_path):
    """What the trainer writes (tensors and plain metadata) loads with ``weights_only=True``
    into a model built with other settings, which then answers as the trained one."""
    model, mapper = small(), SignalMapper()
    events = _sessions(200)
    for start in range(0, len(events), 100):
        model.learn(mapper.map(events[start:start + 100]))
    state, meta, items, vectors = model.export_version()
    torch.save({"state": state, "meta": meta}, tmp_path / "version.pt")
    saved = torch.load(tmp_path / "version.pt", weights_only=True)
    other = {"layers": 1, "heads": 2} if isinstance(model, SASRecModel) else {}
    loaded = small(hidden=8, max_length=5, **other)
    loaded.load_version(saved["state"], saved["meta"])
    queries = [Query("x", ("c1i0", "c1i1")), Query("y", ("c0i2",))]
    assert [r.items for r in loaded.recommend(queries, 5)] == \
        [r.items for r in model.recommend(queries, 5)]
    assert loaded.version == model.version and vectors.shape == (len(items), 32)
