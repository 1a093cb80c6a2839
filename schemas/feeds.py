"""The feed document: what ``<prefix>:{u:<user>}:feed`` holds and the API returns.

Every list the serving pipeline builds is one :class:`Feed` — stored, returned on demand, or
replayed. ``position`` and ``propensity`` are what a front end sends back (with the
``recommendation_id``) on the events a list causes; see ``docs/frontend.md``.
"""

from __future__ import annotations

import msgspec


class FeedItem(msgspec.Struct):
    item_id: str
    score: float
    reason: str
    position: int = 0
    propensity: float = 1.0


class Feed(msgspec.Struct):
    user_id: str
    items: list[FeedItem]
    recommendation_id: str
    generated_at: float
    source: str
    model_version: str = "blend-v1"
    policy: str = "greedy"


encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(Feed).decode
