"""Fuzzing the wire decoder (Hypothesis, 10,000 cases each): whatever bytes arrive, the event
decoder (as the worker runs it: erasure requests too) and the envelope splitter answer with
valid events, an erasure or named problems, never raise,
and every part of an envelope is accounted for exactly once; the dead-letter record of any
rejected message always fits its size limit."""

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from schemas import dlq
from schemas.events import Erasure, split_message, split_source

FUZZ = settings(max_examples=10_000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)
fields = st.sampled_from(["event_id", "user_id", "item_id", "type", "timestamp", "session_id",
                          "dwell_ms", "item_duration_ms", "position", "recommendation_id",
                          "context", "schema_version", "extra"])
small = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
ids = st.sampled_from(["", "u", "ü:{x}/\\0", "x" * 256, "x" * 257]) | st.text(max_size=6)
event_like = st.fixed_dictionaries(
    {"event_id": ids, "user_id": ids, "item_id": ids,
     "type": st.sampled_from(["click", "like", "teleport", "view", ""]),
     "timestamp": st.sampled_from([1.7e9, 0, -1, 4e9, 1e300]) | st.floats(0, 4e9)},
    optional={"dwell_ms": small, "position": small, "schema_version": st.integers(0, 2),
              "context": st.dictionaries(st.text(max_size=70), small, max_size=20)}
) | st.dictionaries(fields, small, max_size=6)


def check(raw: bytes, max_bytes: int = 100_000) -> None:
    valid, invalid, erasure = split_source(raw, max_bytes)
    assert erasure is None or (isinstance(erasure, Erasure) and not valid and not invalid)
    assert all(isinstance(index, (int, type(None))) for index, _, _ in invalid)
    assert all(exc.errors and all(e["field"] and e["reason"] for e in exc.errors)
               for _, _, exc in invalid)
    if invalid:
        record = dlq.dead_letter(raw, invalid, "t", 0, 0, len(valid), max_bytes=max_bytes)
        assert len(dlq.encode(record)) <= max_bytes


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_decoder(raw):
    check(raw)


@FUZZ
@given(json_values)
def test_arbitrary_json_never_crashes_the_decoder(value):
    check(json.dumps(value).encode())  # NaN, Infinity and 2^70 included: not all valid JSON


@FUZZ
@given(st.lists(event_like, min_size=1, max_size=12), st.integers(0, 3))
def test_every_envelope_part_is_valid_or_named_once(events, header):
    envelope = {"events": events} if header == 0 else {"events": events, "schema_version": header}
    raw = json.dumps(envelope).encode()
    check(raw)
    valid, invalid = split_message(raw, 100_000)
    if not any(index is None for index, _, _ in invalid):  # the envelope itself was sound
        assert len(valid) + len({index for index, _, _ in invalid}) == len(events)


def _repeats_a_key(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise KeyError("repeated")
    return dict(pairs)


@FUZZ
@given(st.lists(event_like, min_size=1, max_size=6), st.data())
def test_an_event_is_accepted_only_if_no_object_repeats_a_key(events, data):
    """Events written as JSON text with a key sometimes repeated (and spaces sometimes put
    around the colon): an accepted event never came from an object that repeated a key, and
    a valid event that repeats none is never refused for that."""
    texts = []
    for event in events:
        items = [(json.dumps(k), json.dumps(v)) for k, v in event.items()]
        if items and data.draw(st.booleans()):
            items.append(data.draw(st.sampled_from(items)))
        colon = data.draw(st.sampled_from([":", " : ", ":"]))
        texts.append("{" + ",".join(k + colon + v for k, v in items) + "}")
    raw = ('{"events":[' + ",".join(texts) + "]}").encode()
    valid, invalid = split_message(raw, 100_000)
    refused = {index for index, _, _ in invalid}
    for index, text in enumerate(texts):
        try:
            json.loads(text, object_pairs_hook=_repeats_a_key)
            repeats = False
        except KeyError:
            repeats = True
        except ValueError:
            continue
        if repeats:
            assert index in refused or None in refused
        elif None not in refused and index in refused:
            assert not any("repeated" in e["reason"] for i, _, exc in invalid if i == index
                           for e in exc.errors)
    assert len(valid) + len(refused - {None}) == len(events) or None in refused


erasure_like = st.fixed_dictionaries(
    {"request_id": ids, "user_id": ids, "timestamp": st.sampled_from([1.7e9, 0, 4e9]) | small},
    optional={"session_ids": st.lists(ids, max_size=3) | small, "extra": small})


@FUZZ
@given(erasure_like, st.sampled_from([None, 1, 2, "1"]), st.booleans())
def test_erasure_requests_decode_to_one_request_or_named_problems(request, version, extra):
    message = {"erase": request, **({} if version is None else {"schema_version": version}),
               **({"events": []} if extra else {})}
    raw = json.dumps(message).encode()
    check(raw)
    _, invalid, erasure = split_source(raw)
    if erasure is not None:
        assert erasure.user_id == request["user_id"] and 1 <= len(erasure.user_id) <= 256
        assert erasure.keys[0] == erasure.user_id
    else:
        assert invalid
