import pytest

from stream.log_positions import find_mismatches, reset_target


def test_watermarks_inside_the_log_fit_and_others_are_named():
    starts = {0: 0, 1: 0, 2: 100, 3: 0}
    ends = {0: 50, 1: 10, 2: 200, 3: 0}
    marks = {0: 49, 1: 30, 2: 40, 3: None}
    found = {m.partition: m for m in find_mismatches("t", marks, starts, ends)}
    assert set(found) == {1, 2}  # 0: last offset applied; 3: nothing applied yet
    assert "went backwards" in found[1].reason and "--partition 1" in found[1].reason
    assert "deleted by retention" in found[2].reason and "41..99" in found[2].reason
    assert find_mismatches("t", {0: 99}, {0: 100}, {0: 150}) == []  # next offset = log start


def test_reset_targets():
    assert reset_target("start", 5, 9) == 5 and reset_target("end", 5, 9) == 9
    assert reset_target("7", 5, 9) == 7
    for bad in ("4", "10", "-1", "later"):
        with pytest.raises(ValueError, match="start, end or an offset"):
            reset_target(bad, 5, 9)
