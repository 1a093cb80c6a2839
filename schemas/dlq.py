"""The dead-letter record: what the ``interactions.dlq`` topic holds for each rejected message.

One record per source message that had any invalid part. The original bytes travel in full
(base64) whenever the record still fits the topic's message size; a larger original (an
invalid message near the size limit grows by 4/3 in base64) is left where it is, and the
record points to it: ``source`` topic, partition and offset, with its size and SHA-256, so
nothing is lost while the source topic retains it. ``problems`` says which event (envelope
index) failed, on which field, and why (the first :data:`MAX_PROBLEMS`; the rest are
counted). Valid events of a partly invalid envelope are applied and counted in
``valid_events_applied``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import msgspec


#: Problems listed in one record at most, and characters kept of each reason.
MAX_PROBLEMS = 50
MAX_REASON_CHARS = 300
#: The largest record by default (the topics' message size, schemas.events).
DEFAULT_MAX_RECORD_BYTES = 1_000_000


class Problem(msgspec.Struct):
    field: str
    reason: str
    index: int | None = None


class SourcePosition(msgspec.Struct):
    topic: str
    partition: int
    offset: int


class DeadLetter(msgspec.Struct):
    reason: str
    problems: list[Problem]
    source: SourcePosition
    original_b64: str  # "" when original_omitted
    valid_events_applied: int
    failed_at: float
    original_size: int = 0
    original_sha256: str = ""
    original_omitted: bool = False  # too large to carry: read it at ``source``
    problems_omitted: int = 0

    @property
    def original(self) -> bytes | None:
        """The rejected message's bytes, or ``None`` when the record only points to them."""
        return None if self.original_omitted else base64.b64decode(self.original_b64)


def dead_letter(raw: bytes, problems: list[tuple[int | None, Any, Any]], topic: str,
                partition: int, offset: int, valid_events: int,
                max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> DeadLetter:
    """Build the record for one message from ``schemas.events.split_message``'s problems;
    its encoding never exceeds ``max_bytes`` (the original is omitted where it would)."""
    flat = [Problem(field=err["field"][:MAX_REASON_CHARS],
                    reason=err["reason"][:MAX_REASON_CHARS], index=index)
            for index, _, exc in problems for err in exc.errors]
    head = f"{flat[0].field}: {flat[0].reason}" if flat else "invalid"
    reason = head if len(problems) == 1 else f"{len(problems)} invalid events; first: {head}"
    record = DeadLetter(reason=reason, problems=flat[:MAX_PROBLEMS],
                        source=SourcePosition(topic=topic, partition=partition, offset=offset),
                        original_b64="", valid_events_applied=valid_events,
                        failed_at=time.time(), original_size=len(raw),
                        original_sha256=hashlib.sha256(raw).hexdigest(),
                        problems_omitted=max(len(flat) - MAX_PROBLEMS, 0))
    if len(encode(record)) + 4 * -(-len(raw) // 3) <= max_bytes:
        record.original_b64 = base64.b64encode(raw).decode("ascii")
    else:
        record.original_omitted = True
    return record


def encode(record: DeadLetter) -> bytes:
    return msgspec.json.encode(record)


def decode(raw: bytes) -> DeadLetter:
    return msgspec.json.decode(raw, type=DeadLetter)
