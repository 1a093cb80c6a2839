"""Re-drive planning: what of a dead letter's original is published again after a fix."""

import hashlib
import json

from schemas import dlq
from schemas.events import split_message
from stream.dead_letters import (ERASURE_NOT_REDRIVEN, INTERNAL_NOT_REDRIVEN, NOTHING_LEFT,
                                 ORIGINAL_CHANGED,
                                 ORIGINAL_GONE, REDRIVEN, STILL_INVALID, UNKNOWN_APPLIED,
                                 plan_redrive, reason_kind)

LIMIT = 1_000_000


def event(n: int, **fields) -> dict:
    return {"event_id": f"e{n}", "user_id": "u1", "item_id": f"i{n}", "type": "click",
            "timestamp": 1.7e9 + n, **fields}


def envelope(*events: dict) -> bytes:
    return json.dumps({"schema_version": 1, "events": list(events)}).encode()


def letter(raw: bytes, failed: list[int | None], applied: int, topic: str = "interactions",
           omitted: int = 0) -> dlq.DeadLetter:
    """A record as an older decoder would have written it: these indexes failed then."""
    problems = [dlq.Problem(field="$" if i is None else f"events[{i}].type", reason="unknown",
                            index=i) for i in failed]
    return dlq.DeadLetter(reason="x", problems=problems,
                          source=dlq.SourcePosition(topic=topic, partition=0, offset=7),
                          original_b64="", valid_events_applied=applied, failed_at=1.7e9,
                          original_size=len(raw),
                          original_sha256=hashlib.sha256(raw).hexdigest(),
                          problems_omitted=omitted)


def ids(plan) -> list[str]:
    return [e.event_id for e in plan.events]


def test_a_partly_applied_envelope_redrives_only_the_events_that_failed_then():
    raw = envelope(event(0), event(1), event(2))
    plan = plan_redrive(letter(raw, [1], applied=2), raw, "items", LIMIT)
    assert (plan.outcome, ids(plan), plan.still_invalid) == (REDRIVEN, ["e1"], 0)


def test_events_valid_now_are_matched_to_their_envelope_index_past_ones_still_invalid():
    raw = envelope(event(0), event(1, dwell_ms=-5), event(2))  # 1 still invalid, 2 valid now
    plan = plan_redrive(letter(raw, [1, 2], applied=1), raw, "items", LIMIT)
    assert (plan.outcome, ids(plan), plan.still_invalid) == (REDRIVEN, ["e2"], 1)


def test_an_event_applied_then_that_todays_rules_refuse_is_not_counted_as_still_invalid():
    raw = envelope(event(0, dwell_ms=-5), event(1))  # 0 was applied then, 1 failed
    plan = plan_redrive(letter(raw, [1], applied=1), raw, "items", LIMIT)
    assert (plan.outcome, ids(plan), plan.still_invalid) == (REDRIVEN, ["e1"], 0)


def test_a_dead_letter_still_invalid_publishes_nothing():
    raw = envelope(event(0), event(1, dwell_ms=-5))
    valid, problems = split_message(raw)
    record = dlq.dead_letter(raw, problems, "interactions", 0, 3, len(valid))  # as the worker
    plan = plan_redrive(record, record.original, "items", LIMIT)
    assert (plan.outcome, plan.events, plan.still_invalid) == (STILL_INVALID, [], 1)


def test_a_message_rejected_whole_redrives_every_event_valid_now():
    raw = envelope(event(0), event(1))
    plan = plan_redrive(letter(raw, [None], applied=0), raw, "items", LIMIT)
    assert (plan.outcome, ids(plan)) == (REDRIVEN, ["e0", "e1"])


def test_nothing_left_when_what_failed_then_is_valid_but_was_not_in_the_problems():
    raw = envelope(event(0), event(1))
    plan = plan_redrive(letter(raw, [], applied=2), raw, "items", LIMIT)
    assert (plan.outcome, plan.events) == (NOTHING_LEFT, [])


def test_a_partly_applied_envelope_with_problems_omitted_is_left_for_a_person():
    raw = envelope(event(0), event(1), event(2))
    plan = plan_redrive(letter(raw, [1], applied=1, omitted=1), raw, "items", LIMIT)
    assert (plan.outcome, plan.events) == (UNKNOWN_APPLIED, [])


def test_an_original_gone_or_changed_at_its_offset_publishes_nothing():
    raw = envelope(event(0))
    record = letter(raw, [None], applied=0)
    assert plan_redrive(record, None, "items", LIMIT).outcome == ORIGINAL_GONE
    changed = plan_redrive(record, envelope(event(9)), "items", LIMIT)
    assert (changed.outcome, changed.events) == (ORIGINAL_CHANGED, [])


def test_item_descriptions_valid_now_are_all_published_again():
    raw = json.dumps({"schema_version": 1, "items": [
        {"item_id": "m1", "timestamp": 1.7e9}, {"item_id": "m2", "timestamp": 1.7e9},
        {"item_id": "", "timestamp": 1.7e9}]}).encode()
    plan = plan_redrive(letter(raw, [1], applied=1, topic="items"), raw, "items", LIMIT)
    assert plan.outcome == REDRIVEN and [r.item_id for r in plan.events] == ["m1", "m2"]
    assert plan.still_invalid == 1


def test_reason_kinds_group_the_same_failure_at_any_index():
    raw = envelope(event(0))
    assert reason_kind(letter(raw, [3], 0)) == reason_kind(letter(raw, [12], 0)) \
        == "events[].type: unknown"


def test_a_dead_lettered_erasure_valid_now_is_not_redriven_but_named():
    """Applied late, an erasure would erase the user's events sent after it: the operator
    sends it again (docs/events.md#erasure)."""
    raw = json.dumps({"schema_version": 1, "erase": {"request_id": "r", "user_id": "u1",
                                                     "timestamp": 1.7e9}}).encode()
    plan = plan_redrive(letter(raw, [None], applied=0), raw, "items", LIMIT)
    assert (plan.outcome, plan.events) == (ERASURE_NOT_REDRIVEN, [])
    bad = raw.replace(b'"u1"', b'""')
    assert plan_redrive(letter(bad, [None], applied=0), bad, "items", LIMIT).outcome == \
        STILL_INVALID


def test_a_dead_letter_from_the_workers_item_deltas_topic_is_never_redriven():
    """Only workers write item-delta records: what was dead-lettered there is not an event
    even where its bytes happen to be one now."""
    raw = envelope(event(0))
    plan = plan_redrive(letter(raw, [None], applied=0, topic="item-deltas"), raw, "items", LIMIT,
                        item_deltas_topic="item-deltas")
    assert (plan.outcome, plan.events) == (INTERNAL_NOT_REDRIVEN, [])
    assert plan_redrive(letter(raw, [None], applied=0), raw, "items", LIMIT,
                        item_deltas_topic="item-deltas").outcome == REDRIVEN
