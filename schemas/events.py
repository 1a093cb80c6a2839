"""Interaction events and the batch envelope: the wire contract of the ``interactions`` topic.

A Kafka message on ``interactions`` is UTF-8 JSON, either one event object or an envelope
``{"schema_version": 1, "events": [event, ...]}``, or an erasure request
``{"schema_version": 1, "erase": {"request_id": …, "user_id": …, "session_ids": […],
"timestamp": …}}`` (:class:`Erasure`, keyed by the user like the user's events, so it follows
them). Nothing else is accepted (no pickle).
Validation is msgspec's typed decoder (C, ~750k events/s on one core): one pass both parses
and checks types, bounds and unknown fields.

Example
-------
>>> ev = Interaction(event_id="e1", user_id="u1", item_id="i9", type="click", timestamp=1.7e9)
>>> decode_message(encode_envelope([ev]))[0] == ev
True
>>> try:
...     decode_message(b'{"events": []}')
... except InvalidEvent as exc:
...     print(exc)
events: Expected `array` of length >= 1
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Annotated, Any, Literal, Union

import msgspec

SCHEMA_VERSION = 1
MAX_ID_CHARS = 256
MAX_CONTEXT_ENTRIES = 16
MAX_ENVELOPE_EVENTS = 1000
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: Oldest accepted timestamp (1990-01-01: older logs exist, e.g. MovieLens-100k is 1997;
#: catches 0 and ms-vs-s mix-ups) and the allowed clock skew into the future.
MIN_TIMESTAMP = 631_152_000.0
MAX_FUTURE_SKEW_S = 86_400.0
MAX_DWELL_MS = 86_400_000
#: Deepest JSON nesting a message may have. A valid one needs 4 (envelope, events, event,
#: context); a generic JSON parse recurses once per level, so deeper input is refused first.
MAX_JSON_DEPTH = 32
TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels (or unbalanced)"

EventType = Literal["impression", "click", "view", "dwell", "skip", "like", "dislike",
                    "add_to_cart", "purchase"]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
#: Event types that count as a reward for the list position that caused them.
ENGAGEMENT_TYPES = frozenset({"click", "view", "dwell", "like", "add_to_cart", "purchase"})

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=MAX_DWELL_MS)]
ContextKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ContextValue = Union[Annotated[str, msgspec.Meta(max_length=256)], bool, int, float]
Context = Annotated[dict[ContextKey, ContextValue], msgspec.Meta(max_length=MAX_CONTEXT_ENTRIES)]


class InvalidEvent(ValueError):
    """Input that is not a valid event or envelope. ``errors`` names each field and reason."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['reason']}" for e in errors))

    @classmethod
    def from_msgspec(cls, exc: Exception, prefix: str = "") -> "InvalidEvent":
        reason, _, where = str(exc).partition(" - at `$")
        field = where.rstrip("`").lstrip(".")
        name, sep, rest = reason.partition(": ")  # checks in __post_init__ say "field: reason"
        if sep and name.isidentifier():
            field, reason = ".".join(filter(None, (field, name))), rest
        return cls([{"field": (prefix + field) or "$", "reason": reason}])


class Interaction(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """One user-item interaction.

    ``timestamp`` is event time in unix seconds (fractions allowed). ``dwell_ms`` is the time
    spent on the item; ``item_duration_ms`` its length when known (video, song, article).
    ``position`` and ``recommendation_id`` tie the event to a served list (impression log).
    """

    event_id: Id
    user_id: Id
    item_id: Id
    type: EventType
    timestamp: Annotated[float, msgspec.Meta(ge=MIN_TIMESTAMP)]
    session_id: Id | None = None
    dwell_ms: Millis | None = None
    item_duration_ms: Annotated[int, msgspec.Meta(gt=0, le=MAX_DWELL_MS)] | None = None
    position: Annotated[int, msgspec.Meta(ge=0, lt=10_000)] | None = None
    recommendation_id: Id | None = None
    context: Context | None = None
    schema_version: Literal[1] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not math.isfinite(self.timestamp) or self.timestamp > time.time() + MAX_FUTURE_SKEW_S:
            raise ValueError("timestamp: more than a day in the future (unix seconds expected)")


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """Many events in one Kafka message: per-message overhead is paid once per batch."""

    events: Annotated[list[Interaction], msgspec.Meta(min_length=1,
                                                      max_length=MAX_ENVELOPE_EVENTS)]
    schema_version: Literal[1] = SCHEMA_VERSION


MAX_ERASED_SESSIONS = 1000


class Erasure(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """A request to erase what was learned of one user: their user-keyed state, their
    sessions' state (those named, and the one keyed by the user id where events carried no
    session id), their history, feed and place in the feed queue (docs/events.md#erasure).
    Events of the user sent after it are learned afresh."""

    request_id: Id
    user_id: Id
    timestamp: Annotated[float, msgspec.Meta(ge=MIN_TIMESTAMP)]
    session_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_ERASED_SESSIONS)] = []

    def __post_init__(self) -> None:
        if not math.isfinite(self.timestamp) or self.timestamp > time.time() + MAX_FUTURE_SKEW_S:
            raise ValueError("timestamp: more than a day in the future (unix seconds expected)")

    @property
    def keys(self) -> list[str]:
        """The user's and sessions' keys in user- and session-keyed model tables (a session
        key is its id, or the user id where events carry none)."""
        return list(dict.fromkeys([self.user_id, *self.session_ids]))


class ErasureMessage(msgspec.Struct, forbid_unknown_fields=True):
    """The ``interactions`` message carrying an :class:`Erasure`."""

    erase: Erasure
    schema_version: Literal[1] = SCHEMA_VERSION


class ErasureBody(msgspec.Struct, forbid_unknown_fields=True):
    """The optional body of ``POST /v1/users/<id>/erase``: sessions to erase too, and the
    request's id (a new one when absent)."""

    session_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_ERASED_SESSIONS)] = []
    request_id: Id | None = None


def erasure_body_schema() -> dict[str, Any]:
    """JSON Schema of :class:`ErasureBody` (inline: it nests no other struct)."""
    _, defs = msgspec.json.schema_components([ErasureBody])
    return defs["ErasureBody"]


def decode_erasure_body(raw: bytes) -> ErasureBody:
    """An :class:`ErasureBody` from JSON bytes (empty: the defaults), or :class:`InvalidEvent`."""
    if not raw.strip():
        return ErasureBody()
    if nesting_exceeds(raw, MAX_JSON_DEPTH):
        raise InvalidEvent([{"field": "$", "reason": TOO_DEEP}])
    repeated = repeated_keys(raw).get(None)
    if repeated:
        raise repeated_error(repeated)
    try:
        return msgspec.json.decode(raw, type=ErasureBody)
    except msgspec.ValidationError as exc:
        raise InvalidEvent.from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent([{"field": "$", "reason": f"not JSON: {exc}"}]) from None


_envelope_decoder = msgspec.json.Decoder(Envelope)
_event_decoder = msgspec.json.Decoder(Interaction)
_encoder = msgspec.json.Encoder()
Problem = tuple[Union[int, None], Any, InvalidEvent]


def encode_event(event: Interaction) -> bytes:
    """Serialise one event as a message."""
    return _encoder.encode(event)


def encode_envelope(events: list[Interaction]) -> bytes:
    """Serialise events as one envelope message."""
    return _encoder.encode(Envelope(events=events))


def encode_erasure(erasure: Erasure) -> bytes:
    """Serialise an erasure request as its ``interactions`` message."""
    return _encoder.encode(ErasureMessage(erase=erasure))


def validate_erasure(obj: Any) -> Erasure:
    """Validate a decoded JSON object as an erasure request (the ``erase`` object), or raise
    :class:`InvalidEvent`."""
    return _validated(obj, Erasure)


def split_source(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                 ) -> tuple[list[Interaction], list[Problem], Erasure | None]:
    """:func:`split_message` of a message read from ``interactions``, where an erasure
    request may come too: (events, problems, the erasure request or None). Events pay
    nothing for it: an erasure is looked for only in a message refused whole."""
    events, problems = split_message(raw, max_bytes)
    if events or len(problems) != 1 or problems[0][0] is not None:
        return events, problems, None
    doc = problems[0][1]
    if not (isinstance(doc, dict) and "erase" in doc):
        return events, problems, None
    try:
        repeated = repeated_keys(raw).get(None)
        if repeated:
            raise repeated_error(repeated)
        message = msgspec.convert(doc, ErasureMessage)
    except msgspec.ValidationError as exc:
        return [], [(None, doc, InvalidEvent.from_msgspec(exc))], None
    except InvalidEvent as exc:
        return [], [(None, doc, exc)], None
    return [], [], message.erase


def validate_event(obj: Any) -> Interaction:
    """Validate a decoded JSON object (e.g. a dict) as an event, or raise :class:`InvalidEvent`."""
    return _validated(obj, Interaction)


def _validated(obj: Any, kind: type):
    """``obj`` as a ``kind`` struct (already one: as it is), or :class:`InvalidEvent`."""
    if isinstance(obj, kind):
        return obj
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        raise InvalidEvent.from_msgspec(exc) from None


def decode_message(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[Interaction]:
    """Decode one message into events, or raise :class:`InvalidEvent` naming every bad field.

    Use :func:`split_message` to keep the valid events of a partly invalid envelope.
    """
    valid, invalid = split_message(raw, max_bytes)
    if invalid:
        raise InvalidEvent([err for _, _, exc in invalid for err in exc.errors])
    return valid


def split_message(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                  ) -> tuple[list[Interaction], list[Problem]]:
    """Split a message into valid events and ``(index, fragment, error)`` per invalid part.

    ``index`` is the event's position in an envelope (``None`` when the whole message is bad),
    ``fragment`` the offending JSON value (``None`` when the bytes are not JSON at all).
    """
    if len(raw) > max_bytes:
        return [], [(None, None, InvalidEvent([{"field": "$", "reason":
                     f"message of {len(raw)} bytes exceeds the {max_bytes}-byte limit"}]))]
    decoded, envelope = None, True
    try:  # fast path: a fully valid envelope, then a fully valid single event
        decoded = _envelope_decoder.decode(raw).events
    except msgspec.DecodeError:
        try:
            decoded, envelope = [_event_decoder.decode(raw)], False
        except msgspec.DecodeError:
            pass
    repeated = None
    if decoded is not None:
        if keys_certainly_unique(raw, decoded, envelope):
            return decoded, []
        repeated = repeated_keys(raw)  # not proved by counting (explicit nulls, escapes...)
        if not repeated:
            return decoded, []
    if nesting_exceeds(raw, MAX_JSON_DEPTH):
        return [], [(None, None, InvalidEvent([{"field": "$", "reason": TOO_DEEP}]))]
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        return [], [(None, None, InvalidEvent([{"field": "$", "reason": f"not JSON: {exc}"}]))]
    if repeated is None:
        repeated = repeated_keys(raw)
    if isinstance(doc, dict) and "events" in doc:
        if None in repeated:
            return [], [(None, doc, repeated_error(repeated[None]))]
        return _split_envelope(doc, repeated)
    try:
        if None in repeated:
            raise repeated_error(repeated[None])
        return [validate_event(doc)], []
    except InvalidEvent as exc:
        return [], [(None, doc, exc)]


_event_list_encoder = msgspec.json.Encoder()


def keys_certainly_unique(raw: bytes, events: list[Interaction], envelope: bool) -> bool:
    """Whether no JSON object in ``raw`` (which decoded to ``events``) repeats a key, proved by
    counting colons (C-speed, no second parse); False means "not proved": check with
    :func:`repeated_keys`.

    Without a backslash, strings decode to their own bytes, so the colons inside strings are
    the same in ``raw`` and in the re-encoded events; every other colon follows a key. The
    re-encoding holds one key per non-default field and per distinct context key;
    ``schema_version`` (one allowed value) is counted as written. Any extra colon means a
    repeat or an explicit default: not proved.
    """
    if b"\\" in raw:
        return False
    versions = raw.count(b'"schema_version":')
    if versions > envelope and any(e.context and "schema_version" in e.context for e in events):
        return False  # that key would be counted twice below: it could hide a repeat
    return raw.count(b":") == _event_list_encoder.encode(events).count(b":") + envelope + versions


class RepeatedKeys(dict):
    """A JSON object that repeated keys; ``paths`` names them (dotted for nested objects)."""

    paths: list[str]


def _object_checking_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    paths: list[str] = []
    for key, value in pairs:
        if key in seen:
            paths.append(key)
        seen.add(key)
        if isinstance(value, RepeatedKeys):
            paths.extend(f"{key}.{path}" for path in value.paths)
    if not paths:
        return dict(pairs)
    obj = RepeatedKeys(pairs)
    obj.paths = paths
    return obj


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads_checking_keys(raw: bytes) -> Any:
    """Python's JSON parse, where an object that repeats a key comes back as a
    :class:`RepeatedKeys` naming them; raises ``ValueError`` on what is not JSON (NaN and
    Infinity included)."""
    return json.loads(raw, object_pairs_hook=_object_checking_keys,
                      parse_constant=_refuse_constant)


def repeated_keys(raw: bytes) -> dict[int | None, list[str]]:
    """Keys repeated inside one JSON object, by envelope event index (``None``: the message
    itself or its single event). Parsers disagree on which copy wins, so such input is refused
    rather than guessed. An exact (Python-speed) check for what the fast path cannot prove."""
    try:
        doc = loads_checking_keys(raw)
    except (ValueError, RecursionError):
        return {}  # not JSON: reported by the decoder that found it
    found: dict[int | None, list[str]] = {}
    if isinstance(doc, RepeatedKeys):  # lists do not pass repeats up: events come below
        found[None] = doc.paths
    events = doc.get("events") if isinstance(doc, dict) else None
    for index, event in enumerate(events if isinstance(events, list) else ()):
        if isinstance(event, RepeatedKeys):
            found[index] = event.paths
    return found


def repeated_error(paths: list[str]) -> InvalidEvent:
    return InvalidEvent([{"field": path, "reason":
                          "key repeated in one JSON object (which copy wins is ambiguous)"}
                         for path in paths])


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether JSON text ``raw`` nests arrays/objects deeper than ``limit`` or leaves brackets
    unbalanced, without parsing it: C-speed byte operations, ``limit`` passes at most."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot be that deep
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if re.search(rb"[\[{]{%d}" % (limit + 1), brackets):
        return True  # that many opening brackets in a row: the usual poison, found at once
    for _ in range(limit):  # each pass removes the innermost level
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return bool(brackets)


def _split_envelope(doc: dict[str, Any], repeated: dict[int | None, list[str]]
                    ) -> tuple[list[Interaction], list[Problem]]:
    """Validate an envelope's events one by one so that good events survive bad neighbours;
    ``repeated`` names the events that repeat a key (refused)."""
    events = doc["events"]
    try:  # the envelope itself (header, list bounds), with the events checked below
        msgspec.convert({**doc, "events": [_PLACEHOLDER] * len(events)}
                        if isinstance(events, list) else doc, Envelope)
    except msgspec.ValidationError as exc:
        return [], [(None, doc, InvalidEvent.from_msgspec(exc))]
    valid, invalid = [], []
    for index, fragment in enumerate(events):
        try:
            if index in repeated:
                raise repeated_error(repeated[index])
            valid.append(validate_event(fragment))
        except InvalidEvent as exc:
            invalid.append((index, fragment, at_index("events", index, exc)))
    return valid, invalid


def at_index(list_key: str, index: int, exc: InvalidEvent) -> InvalidEvent:
    """``exc`` with each field named inside an envelope's list (``events[3].user_id``)."""
    return InvalidEvent([{"field": f"{list_key}[{index}].{e['field']}".rstrip(".$"),
                          "reason": e["reason"]} for e in exc.errors])


_PLACEHOLDER = Interaction(event_id="x", user_id="x", item_id="x", type="view",
                           timestamp=MIN_TIMESTAMP)


def json_schema(erasure: bool = True) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one ``interactions`` message, for non-Python producers
    (``erasure=False``: events only, as ``POST /v1/events`` takes them)."""
    kinds = [Envelope, Interaction, *([ErasureMessage] if erasure else [])]
    refs, defs = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "streamrec interactions message",
            "description": "One interaction event, an envelope of 1..1000 events"
                           + (", or an erasure request (keyed by its user id)." if erasure
                              else "."),
            "oneOf": list(refs), "$defs": defs}
