"""Impression log records: one per served list, on the ``impressions`` topic (key: user id).

Every list a front end receives is logged with its recommendation id, the policy and model
version that produced it, and per position the item, the propensity with which the policy put
it there, its score and its explanation. Events that carry the ``recommendation_id`` (and
``position``) become the rewards of off-policy evaluation (:mod:`replay.rewards`).

Example
-------
>>> log = ImpressionLog("r1", "u1", "epsilon-greedy", "blend-v1", 1.7e9,
...                     [LoggedItem("i1", 0, 0.95, 1.0, "trending")])
>>> decode(encode(log)) == log
True
"""

from __future__ import annotations

import msgspec


class LoggedItem(msgspec.Struct, frozen=True):
    item_id: str
    position: int
    propensity: float
    score: float
    reason: str


class ImpressionLog(msgspec.Struct, frozen=True):
    recommendation_id: str
    user_id: str
    policy: str
    model_version: str
    generated_at: float
    items: list[LoggedItem]


encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(ImpressionLog).decode  # raises msgspec errors when malformed
