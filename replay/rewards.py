"""Join the impression log with the interactions that carry its ``recommendation_id``.

Each logged position becomes one bandit round: the item shown, the propensity it was shown
with, the policy, and a reward — 1 when an event with the same recommendation id and item
(and position, when the event carries one) is a positive engagement (click, view, dwell, like,
cart, purchase), 0 otherwise; a skip or dislike is an explicit 0. The rounds feed the
estimators of :mod:`replay.ope` and the Thompson-sampling counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from schemas.events import ENGAGEMENT_TYPES, Interaction
from schemas.impressions import ImpressionLog


@dataclass(frozen=True)
class Round:
    recommendation_id: str
    user_id: str
    item_id: str
    position: int
    propensity: float
    policy: str
    reward: float


def join_rewards(logs: Iterable[ImpressionLog], events: Iterable[Interaction]) -> list[Round]:
    rewarded: set[tuple[str, str]] = set()
    at_position: set[tuple[str, str, int]] = set()
    for e in events:
        if e.recommendation_id is None or e.type not in ENGAGEMENT_TYPES:
            continue
        if e.position is None:
            rewarded.add((e.recommendation_id, e.item_id))
        else:
            at_position.add((e.recommendation_id, e.item_id, e.position))
    rounds = []
    for log in logs:
        for item in log.items:
            hit = ((log.recommendation_id, item.item_id) in rewarded
                   or (log.recommendation_id, item.item_id, item.position) in at_position)
            rounds.append(Round(log.recommendation_id, log.user_id, item.item_id, item.position,
                                item.propensity, log.policy, 1.0 if hit else 0.0))
    return rounds
