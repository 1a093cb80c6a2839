from collections import Counter

from schemas.events import decode_message, encode_envelope
from stream.simulator import UserSimulator


def test_same_seed_same_events_other_seed_other_events():
    a = list(UserSimulator(100, 300, seed=3).events(500, 1.7e9))
    b = list(UserSimulator(100, 300, seed=3).events(500, 1.7e9))
    c = list(UserSimulator(100, 300, seed=4).events(500, 1.7e9))
    assert a == b and a != c


def test_events_are_valid_and_structured():
    sim = UserSimulator(200, 1000, seed=1, impressions=True)
    events = list(sim.events(3000, 1.7e9))
    assert decode_message(encode_envelope(events[:1000])) == events[:1000]
    kinds = Counter(e.type for e in events)
    assert kinds["impression"] > 0 and kinds["click"] > 0 and kinds["skip"] > 0
    for e in events:
        if e.type == "skip":
            assert e.dwell_ms < sim.skip_below_ms
        if e.type == "click":
            assert sim.skip_below_ms <= e.dwell_ms <= e.item_duration_ms
    # Zipf-like popularity: the most clicked tenth of items gets a large share of clicks
    clicks = Counter(e.item_id for e in events if e.type == "click")
    top = sum(n for _, n in clicks.most_common(len(clicks) // 10))
    assert top / sum(clicks.values()) > 0.3


def test_users_prefer_items_matching_their_taste():
    sim = UserSimulator(50, 2000, seed=2)
    events = list(sim.events(5000, 1.7e9))
    import numpy as np

    chosen = [sim.affinity(int(e.user_id[1:]), np.array([int(e.item_id[1:])]))[0]
              for e in events if e.type in ("click", "skip")]
    assert np.mean(chosen) > 0.5  # random items average 0


def test_event_ids_are_unique_even_when_timestamps_coincide():
    # a billion events/s: consecutive events share a microsecond and users repeat items
    events = list(UserSimulator(3, 4, seed=2).events(3000, 1.7e9, events_per_s=1e9))
    assert len({e.event_id for e in events}) == len(events)
