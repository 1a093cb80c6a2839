import numpy as np

from stream.vector_changes import MovedVectors, PendingVectors


def test_only_new_or_sufficiently_moved_vectors_are_published_and_memory_is_bounded():
    moved = MovedVectors(min_change=0.1, max_items=2)
    base = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    assert moved.select(["a", "b"], base) == [0, 1]
    nudged = base * np.float32(1.05)  # 5 % each: below the bar, however often repeated
    assert moved.select(["a", "b"], nudged) == []
    drifted = base * np.float32(1.15)  # 15 % away from what was published
    assert moved.select(["a", "b"], drifted) == [0, 1]
    assert moved.select(["c"], base[:1]) == [0]  # a third item evicts the oldest ("a")
    assert moved.select(["a"], drifted[:1]) == [0]  # forgotten, so published again
    assert MovedVectors(min_change=0.0).select(["x", "x"], np.ones((2, 2), np.float32)) == [0]


def test_a_limit_publishes_new_items_then_the_largest_moves_and_defers_the_rest():
    moved = MovedVectors(min_change=0.1)
    base = np.eye(3, dtype=np.float32)
    assert moved.select(["a", "b", "c"], base) == [0, 1, 2]
    drifted = base * np.array([[1.2], [1.5], [1.05]], np.float32)  # c: below the bar
    rows = np.vstack([drifted, np.ones((1, 3), np.float32)])
    chosen, waiting = moved.select_limited(["a", "b", "c", "new"], rows, limit=2)
    assert chosen == [3, 1] and waiting == [0]  # new first, then b (50 %) before a (20 %)
    chosen, waiting = moved.select_limited(["a"], drifted[:1], limit=2)
    assert chosen == [0] and waiting == []  # a's turn came; b is now published as moved


def test_pending_vectors_come_out_new_items_first_then_oldest_change_first():
    moved = MovedVectors(min_change=0.0)
    moved.select(["old1", "old2"], np.ones((2, 2), np.float32))  # published once
    pending = PendingVectors(moved)
    pending.add(["old2", "new1", "old1", "new2", "new1"])  # a repeat keeps its place
    assert len(pending) == 4
    assert pending.take(3) == ["new1", "new2", "old2"]
    pending.add(["new3", "old2"])
    assert pending.take(10) == ["new3", "old1", "old2"]
    assert pending.take(1) == [] and not pending
