import numpy as np

from stream.vector_changes import MovedVectors


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
