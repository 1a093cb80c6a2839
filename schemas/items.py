"""Item attributes: the wire contract of the ``items`` topic (and ``POST /v1/items``).

A message is UTF-8 JSON, one :class:`ItemRecord` or an envelope ``{"schema_version": 1,
"items": [record, ...]}``. A record is the item's *whole* current description (an upsert):
sending it again changes nothing, and of two records for one item the one with the later
``timestamp`` wins whatever order they arrive in. ``available: false`` withdraws an item
from content-based lists. Items are keyed by ``item_id`` on the topic (one partition per item,
so one writer per item).

Invalid input is refused the way events are (:mod:`schemas.events`): bounded size and nesting
before any parse, repeated keys refused, every problem named (``items[2].categories[0]:
Expected str of length >= 1``); the valid records of an envelope survive their neighbours.

Example
-------
>>> rec = ItemRecord(item_id="m1", categories=["Comedy"], tags=["pixar"], timestamp=1.7e9)
>>> split_items(encode_items([rec]))[0] == [rec]
True
>>> split_items(b'{"item_id": ""}')[1][0][2].errors[0]["field"]
'item_id'
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

import msgspec

from schemas.events import (DEFAULT_MAX_MESSAGE_BYTES, MAX_FUTURE_SKEW_S, MAX_JSON_DEPTH,
                            MIN_TIMESTAMP, TOO_DEEP, Id, InvalidEvent, Problem, RepeatedKeys,
                            at_index, loads_checking_keys, nesting_exceeds, repeated_error)

MAX_CATEGORIES = 32
MAX_TAGS = 64
MAX_ENVELOPE_ITEMS = 1000
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ItemRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """What an item is: its categories (genres, departments...), free tags, title.

    ``timestamp`` is when this description was set (unix seconds); ``published_at`` when the
    item became available, if known.
    """

    item_id: Id
    timestamp: Annotated[float, msgspec.Meta(ge=MIN_TIMESTAMP)]
    categories: Annotated[list[Label], msgspec.Meta(max_length=MAX_CATEGORIES)] = []
    tags: Annotated[list[Label], msgspec.Meta(max_length=MAX_TAGS)] = []
    title: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    published_at: Annotated[float, msgspec.Meta(ge=MIN_TIMESTAMP)] | None = None
    available: bool = True
    schema_version: Literal[1] = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.timestamp) or self.timestamp > time.time() + MAX_FUTURE_SKEW_S:
            raise ValueError("timestamp: more than a day in the future (unix seconds expected)")


class ItemEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[list[Any], msgspec.Meta(min_length=1, max_length=MAX_ENVELOPE_ITEMS)]
    schema_version: Literal[1] = 1


_encoder = msgspec.json.Encoder()


def encode_items(records: list[ItemRecord]) -> bytes:
    """Serialise records as one envelope message."""
    return _encoder.encode({"schema_version": 1, "items": records})


def validate_item(obj: Any) -> ItemRecord:
    """A decoded JSON object as a record, or :class:`InvalidEvent` naming the bad field."""
    if isinstance(obj, ItemRecord):
        return obj
    if isinstance(obj, RepeatedKeys):
        raise repeated_error(obj.paths)
    try:
        return msgspec.convert(obj, ItemRecord)
    except msgspec.ValidationError as exc:
        raise InvalidEvent.from_msgspec(exc) from None


def split_items(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                ) -> tuple[list[ItemRecord], list[Problem]]:
    """Valid records and ``(index, fragment, error)`` per invalid part (``index`` None: the
    whole message). Catalogue updates are rare next to events, so every message takes the
    exact path (one Python JSON parse that also finds repeated keys)."""
    def whole(reason: str, fragment: Any = None) -> tuple[list, list[Problem]]:
        return [], [(None, fragment, InvalidEvent([{"field": "$", "reason": reason}]))]

    if len(raw) > max_bytes:
        return whole(f"message of {len(raw)} bytes exceeds the {max_bytes}-byte limit")
    if nesting_exceeds(raw, MAX_JSON_DEPTH):
        return whole(TOO_DEEP)
    try:
        doc = loads_checking_keys(raw)
    except (ValueError, RecursionError) as exc:
        return whole(f"not JSON: {exc}")
    if not (isinstance(doc, dict) and "items" in doc):
        try:
            return [validate_item(doc)], []
        except InvalidEvent as exc:
            return [], [(None, doc, exc)]
    try:
        if isinstance(doc, RepeatedKeys):
            raise repeated_error(doc.paths)
        msgspec.convert(doc, ItemEnvelope)
    except msgspec.ValidationError as exc:
        return [], [(None, doc, InvalidEvent.from_msgspec(exc))]
    except InvalidEvent as exc:
        return [], [(None, doc, exc)]
    valid, invalid = [], []
    for index, fragment in enumerate(doc["items"]):
        try:
            valid.append(validate_item(fragment))
        except InvalidEvent as exc:
            invalid.append((index, fragment, at_index("items", index, exc)))
    return valid, invalid


def latest_per_item(records: list[ItemRecord]) -> dict[str, ItemRecord]:
    """The newest record of each item (later ``timestamp`` wins; on a tie, the later record)."""
    latest: dict[str, ItemRecord] = {}
    for record in records:
        kept = latest.get(record.item_id)
        if kept is None or record.timestamp >= kept.timestamp:
            latest[record.item_id] = record
    return latest


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one ``items`` message, for non-Python producers."""
    [record_ref], defs = msgspec.json.schema_components([ItemRecord],
                                                        ref_template="#/$defs/{name}")
    envelope = {"type": "object", "additionalProperties": False, "required": ["items"],
                "properties": {"items": {"type": "array", "minItems": 1,
                                         "maxItems": MAX_ENVELOPE_ITEMS, "items": record_ref},
                               "schema_version": {"const": 1}}}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "streamrec items message",
            "description": "One item description, or an envelope of 1..1000 descriptions.",
            "oneOf": [envelope, record_ref], "$defs": defs}
