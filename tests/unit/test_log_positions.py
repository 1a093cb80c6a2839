import pytest

from stream.log_positions import (LogMismatch, find_mismatches, reset_target,
                                  topic_ids_to_record)


def test_watermarks_inside_the_log_fit_and_others_are_named():
    starts = {0: 0, 1: 0, 2: 100, 3: 0}
    ends = {0: 50, 1: 10, 2: 200, 3: 0}
    marks = {0: 49, 1: 30, 2: 40, 3: None}
    found = {m.partition: m for m in find_mismatches("t", marks, starts, ends)}
    assert set(found) == {1, 2}  # 0: last offset applied; 3: nothing applied yet
    assert "went backwards" in found[1].reason and "--partition 1" in found[1].reason
    assert "deleted by retention" in found[2].reason and "41..99" in found[2].reason
    assert find_mismatches("t", {0: 99}, {0: 100}, {0: 150}) == []  # next offset = log start


def test_a_changed_topic_id_holds_a_partition_whose_offsets_fit():
    starts, ends = {0: 0, 1: 0, 2: 0, 3: 0}, {0: 500, 1: 500, 2: 500, 3: 500}
    marks = {0: 40, 1: 40, 2: None, 3: 40}
    applied = {0: "old", 1: "new", 2: "old", 3: None}
    found = find_mismatches("t", marks, starts, ends, applied, "new")
    # 0: applied from another topic id; 1: same id; 2: nothing applied; 3: no id recorded
    assert [m.partition for m in found] == [0]
    assert found[0].topic_changed and "went backwards" in found[0].reason
    assert "old" in found[0].reason and "new" in found[0].reason
    assert find_mismatches("t", marks, starts, ends) == []  # offsets alone cannot tell
    assert find_mismatches("t", marks, starts, ends, applied, None) == []  # broker gives none
    # ids are recorded where none is, or nothing is applied yet; never over a held partition
    assert topic_ids_to_record(marks, applied, "new", found) == [2, 3]
    assert topic_ids_to_record(marks, applied, None, found) == []


def test_confirming_a_mismatch_never_drops_a_changed_topic_id():
    from stream.log_positions import LogEndProbe

    probe = LogEndProbe.__new__(LogEndProbe)  # no broker: a changed id needs no read
    changed = LogMismatch("t", 0, 40, 0, 10, "old", "new")
    assert probe.confirm([changed]) == [changed]


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


def test_a_worker_is_stalled_only_when_its_waiting_partitions_do_not_move_for_the_timeout():
    starts, ends = {0: 0, 1: 0}, {0: 100, 1: 100}
    watch = StallWatch(timeout_s=60)

    def check(now, marks, mine=(0, 1)):
        return watch.check(now, marks, starts, ends, list(mine))

    assert check(0, {0: 50, 1: 99}) == (0, [])  # first sight: nothing to compare with
    assert check(10, {0: 50, 1: 99}) == (0, [0])  # partition 0 waits and did not move
    assert check(40, {0: 50, 1: 99}) == (30, [0]) and not watch.stalled(30)
    seconds, unmoved = check(70, {0: 50, 1: 99})
    assert watch.stalled(seconds) and unmoved == [0]
    assert check(80, {0: 60, 1: 99}) == (0, [])  # it moved: the count starts again
    assert check(90, {0: 60, 1: 99}, mine=[1]) == (0, [])  # 0 is another worker's: not mine
    assert check(100, {0: 60, 1: 99}, mine=[]) == (0, [0])  # holding nothing: every partition
    watch.note_activity()  # a Redis retry: not this worker's stall
    assert check(110, {0: 60, 1: 99}) == (0, [])
    assert check(500, {0: 60, 1: 99}) == (0, [0])  # after a freeze: one check starts the clock
    assert check(510, {0: 99, 1: 99}) == (0, [])  # caught up: nothing waits
