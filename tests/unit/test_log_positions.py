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


# --- the stall watch ----------------------------------------------------------------------
from stream.log_positions import StallWatch, unapplied_partitions  # noqa: E402


def test_unapplied_partitions_trust_only_records_that_certainly_exist():
    marks = {0: 9, 1: 9, 2: None, 3: None}
    starts = {0: 0, 1: 0, 2: 5, 3: 5}
    # partition 0: the log ends at 10 (offset 9 applied); 1: a record at 10 waits; 2: empty
    # log after retention; 3: offset 5 waits, nothing applied yet
    ends = {0: 10, 1: 11, 2: 5, 3: 6}
    assert unapplied_partitions(marks, starts, ends) == [1, 3]


def test_a_worker_is_stalled_only_after_checks_spanning_the_timeout_without_a_batch():
    watch = StallWatch(timeout_s=60)
    assert watch.check(0, waiting=True) == 0  # first sight: the clock starts now
    assert watch.check(30, waiting=True) == 30 and not watch.stalled(30)
    assert watch.stalled(watch.check(60, waiting=True))
    watch.note_activity()  # a batch arrived: not stalled, the clock starts again
    assert watch.check(70, waiting=True) == 0
    assert watch.check(200, waiting=True) == 0  # paused process: one check starts the clock
    assert watch.check(210, waiting=False) == 0  # caught up: nothing waits
    assert watch.check(220, waiting=True) == 0 and watch.check(281, waiting=True) == 61
