"""The dead-letter record: what the ``interactions.dlq`` topic holds for each rejected message.

One record per source message that had any invalid part. The original bytes travel in full
(base64), so nothing is lost; ``problems`` says which event (envelope index) failed, on which
field, and why. Valid events of a partly invalid envelope are applied and counted in
``valid_events_applied``.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec


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
    original_b64: str
    valid_events_applied: int
    failed_at: float

    @property
    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)


def dead_letter(raw: bytes, problems: list[tuple[int | None, Any, Any]], topic: str,
                partition: int, offset: int, valid_events: int) -> DeadLetter:
    """Build the record for one message from ``schemas.events.split_message``'s problems."""
    flat = [Problem(field=err["field"], reason=err["reason"], index=index)
            for index, _, exc in problems for err in exc.errors]
    head = f"{flat[0].field}: {flat[0].reason}" if flat else "invalid"
    reason = head if len(problems) == 1 else f"{len(problems)} invalid events; first: {head}"
    return DeadLetter(reason=reason, problems=flat,
                      source=SourcePosition(topic=topic, partition=partition, offset=offset),
                      original_b64=base64.b64encode(raw).decode("ascii"),
                      valid_events_applied=valid_events, failed_at=time.time())


def encode(record: DeadLetter) -> bytes:
    return msgspec.json.encode(record)


def decode(raw: bytes) -> DeadLetter:
    return msgspec.json.decode(raw, type=DeadLetter)
