import math

import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from schemas.events import (MAX_ENVELOPE_EVENTS, Interaction, InvalidEvent, decode_message,
                            encode_envelope, encode_event, json_schema, split_message,
                            validate_event)
from stream.simulator import MALFORMED_KINDS, malformed_message

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click",
        "timestamp": 1_700_000_000.5}


def problems(raw: bytes):
    return [(index, err) for index, _, exc in split_message(raw)[1] for err in exc.errors]


def test_single_event_and_envelope_decode_to_the_same_events():
    event = validate_event(GOOD)
    assert decode_message(encode_event(event)) == [event]
    assert decode_message(encode_envelope([event, event])) == [event, event]


def test_integer_timestamp_accepted_as_seconds():
    assert decode_message(orjson.dumps({**GOOD, "timestamp": 1_700_000_000}))[0].timestamp == 1.7e9


@pytest.mark.parametrize("patch, field, fragment", [
    ({"user_id": 5}, "user_id", "Expected `str`"),
    ({"user_id": ""}, "user_id", "length >= 1"),
    ({"item_id": "x" * 257}, "item_id", "length <= 256"),
    ({"type": "teleport"}, "type", "Invalid enum value"),
    ({"timestamp": 12.0}, "timestamp", ">= 631152000"),
    ({"timestamp": 4.0e9}, "timestamp", "future"),
    ({"dwell_ms": -1}, "dwell_ms", ">= 0"),
    ({"position": 10_000}, "position", "<= 9999"),
    ({"context": {f"k{i}": i for i in range(17)}}, "context", "length <= 16"),
    ({"schema_version": 2}, "schema_version", "Invalid enum value"),
    ({"surprise": 1}, "$", "unknown field `surprise`"),
])
def test_invalid_field_is_named_with_reason(patch, field, fragment):
    [(index, err)] = problems(orjson.dumps({**GOOD, **patch}))
    assert index is None
    assert err["field"] == field
    assert fragment in err["reason"]


def test_missing_field_named():
    raw = orjson.dumps({k: v for k, v in GOOD.items() if k != "item_id"})
    [(_, err)] = problems(raw)
    assert "item_id" in err["reason"]


def test_envelope_keeps_valid_events_and_names_index_of_invalid():
    raw = orjson.dumps({"events": [GOOD, {**GOOD, "dwell_ms": "long"}, {**GOOD, "event_id": "e3"}]})
    valid, invalid = split_message(raw)
    assert [e.event_id for e in valid] == ["e1", "e3"]
    [(index, fragment, exc)] = invalid
    assert index == 1 and fragment["dwell_ms"] == "long"
    assert exc.errors[0]["field"] == "events[1].dwell_ms"


@pytest.mark.parametrize("doc, reason", [
    ({"events": []}, "length >= 1"),
    ({"events": [GOOD] * (MAX_ENVELOPE_EVENTS + 1)}, f"length <= {MAX_ENVELOPE_EVENTS}"),
    ({"events": 5}, "Expected `array`"),
    ({"events": [GOOD], "schema_version": 9}, "Invalid enum value"),
])
def test_bad_envelope_rejected_whole(doc, reason):
    valid, invalid = split_message(orjson.dumps(doc))
    assert valid == [] and len(invalid) == 1
    assert reason in invalid[0][2].errors[0]["reason"]


def test_size_limit_and_garbage_bytes():
    valid, invalid = split_message(orjson.dumps(GOOD), max_bytes=10)
    assert not valid and "exceeds the 10-byte limit" in str(invalid[0][2])
    assert "not JSON" in str(split_message(b"\xff\x00garbage")[1][0][2])


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_is_rejected_with_a_reason(kind):
    valid, invalid = split_message(malformed_message(kind, 3))
    assert invalid and all(exc.errors and exc.errors[0]["reason"] for _, _, exc in invalid)
    assert len(valid) == (1 if kind == "bad_envelope_event" else 0)


def test_decode_message_raises_with_all_fields():
    with pytest.raises(InvalidEvent) as info:
        decode_message(orjson.dumps({"events": [{**GOOD, "user_id": 1}, {**GOOD, "type": 2}]}))
    assert {e["field"] for e in info.value.errors} == {"events[0].user_id", "events[1].type"}


ids = st.text(min_size=1, max_size=40)


@hsettings(max_examples=200, deadline=None)
@given(user=ids, item=ids, ts=st.floats(631_152_000, 1.79e9), dwell=st.none() | st.integers(0, 10**7))
def test_roundtrip_any_valid_event(user, item, ts, dwell):
    event = Interaction(event_id="e", user_id=user, item_id=item, type="view", timestamp=ts,
                        dwell_ms=dwell)
    assert decode_message(encode_envelope([event])) == [event]


def test_json_schema_describes_every_message_shape():
    schema = json_schema()
    assert {ref["$ref"] for ref in schema["oneOf"]} == {
        "#/$defs/Envelope", "#/$defs/Interaction", "#/$defs/ErasureMessage"}
    event = schema["$defs"]["Interaction"]
    assert set(event["required"]) == {"event_id", "user_id", "item_id", "type", "timestamp"}
    assert event["properties"]["user_id"]["maxLength"] == 256
    assert event["additionalProperties"] is False


def test_committed_json_schema_file_is_current():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "schemas" / "interaction.schema.json"
    assert json.loads(path.read_text()) == json_schema(), "run `make docs`"


def test_nan_timestamp_rejected():
    with pytest.raises(InvalidEvent):
        validate_event({**GOOD, "timestamp": math.nan})


@pytest.mark.parametrize("name, raw", [
    ("nested arrays", b"[" * 4000 + b"]" * 4000),
    ("unclosed arrays", b"[" * 4000),
    ("nested objects", b'{"a":' * 2000 + b"1" + b"}" * 2000),
    ("deep context in an envelope", b'{"events":[{"event_id":"a","user_id":"u","item_id":"i",'
     b'"type":"click","timestamp":1.7e9,"context":{"k":' + b"[" * 3000 + b"]" * 3000 + b"}}]}"),
    ("mixed brackets", b"[{" * 1500 + b"}]" * 1500),
])
def test_deeply_nested_json_is_rejected_without_recursing(name, raw):
    from schemas.events import MAX_JSON_DEPTH

    valid, invalid = split_message(raw)
    assert valid == [] and len(invalid) == 1
    assert f"nested deeper than {MAX_JSON_DEPTH}" in str(invalid[0][2])


def test_brackets_inside_strings_do_not_count_as_nesting():
    from schemas.events import nesting_exceeds

    event = {"event_id": "e", "user_id": "u", "item_id": "i", "type": "click",
             "timestamp": 1.7e9, "context": {"q": "[[[[" * 30 + '\\"{{{' * 10}}
    raw = orjson.dumps({"events": [{**event, "event_id": f"e{n}"} for n in range(20)]})
    assert not nesting_exceeds(raw, 32)
    assert len(decode_message(raw)) == 20
    assert nesting_exceeds(b"[" * 40 + b"]" * 40, 32) and not nesting_exceeds(
        b"[" * 32 + b"]" * 32, 32)


EVENT_TEXT = ('"event_id":"e1","user_id":"u1","item_id":"i1","type":"click",'
              '"timestamp":1700000000.5')


@pytest.mark.parametrize("raw, index, field", [
    ('{' + EVENT_TEXT + ',"user_id":"u2"}', None, "user_id"),
    ('{' + EVENT_TEXT + ' , "user_id" : "u2"}', None, "user_id"),  # spaces around the colon
    ('{' + EVENT_TEXT + ',"context":{"a":1,"a":2}}', None, "context.a"),
    ('{' + EVENT_TEXT + ',"context":{"schema_version":1,"a":1,"a":2}}', None, "context.a"),
    ('{"event_id":"e\\"1",' + EVENT_TEXT[16:] + ',"item_id":"i2"}', None, "item_id"),
    ('{"events":[{' + EVENT_TEXT + '}],"events":[{' + EVENT_TEXT + '}]}', None, "events"),
    ('{"events":[{' + EVENT_TEXT + '},{' + EVENT_TEXT.replace("e1", "e2") + ',"type":"skip"}]}',
     1, "type"),
])
def test_repeated_keys_are_refused_and_named(raw, index, field):
    valid, invalid = split_message(raw.encode())
    assert [(i, e["field"]) for i, _, exc in invalid for e in exc.errors] == [
        (index, field if index is None else f"events[{index}].{field}")]
    assert "repeated" in str(invalid[0][2])
    assert len(valid) == (1 if index == 1 else 0)  # the envelope's other event survives


@pytest.mark.parametrize("raw", [
    '{' + EVENT_TEXT + ',"session_id":null,"schema_version":1}',  # explicit defaults
    '{"events":[{' + EVENT_TEXT + '}],"schema_version":1}',
    '{"event_id":":e1:","user_id":"u:1","item_id":"i1","type":"click","timestamp":1.7e9,'
    '"context":{"a:b":"c:d","schema_version":"x"}}',  # colons inside strings
    '{"event_id":"e\\"1","user_id":"u1","item_id":"i1","type":"click","timestamp":1.7e9}',
])
def test_keys_written_once_are_accepted_however_the_json_is_spelled(raw):
    assert len(decode_message(raw.encode())) == 1


def test_keys_proved_unique_by_counting_for_sdk_output():
    from schemas.events import keys_certainly_unique

    events = [Interaction(**GOOD, context={"page": "home:top"}, session_id="s")] * 3
    assert keys_certainly_unique(encode_envelope(events), events, envelope=True)
    assert keys_certainly_unique(encode_event(events[0]), events[:1], envelope=False)
