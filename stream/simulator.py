"""A seedable simulator of users: the demo's default traffic and the load generator.

Model: items have latent vectors and a Zipf-like popularity; users have latent tastes. A user
session step draws 32 candidates by popularity and picks one with probability
∝ exp(affinity / temperature) (affinity = taste · item vector), optionally logging an
impression first, then a click; dwell
is log-normal with a median that grows with affinity (clipped to the item's duration), and a
dwell under ``skip_below_ms`` is reported as a ``skip``. Strong affinity adds likes, carts and
purchases. Everything derives from ``seed``: two simulators with one seed emit the same events.

Example
-------
>>> sim = UserSimulator(n_users=50, n_items=200, seed=7)
>>> events = list(sim.events(100, start_ts=1.7e9))
>>> len(events), events[0].user_id == list(UserSimulator(50, 200, seed=7).events(1, 1.7e9))[0].user_id
(100, True)
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from schemas.events import Interaction
from schemas.items import ItemRecord


class UserSimulator:
    """Synthetic interaction streams with known structure (tastes, popularity, sessions)."""

    def __init__(self, n_users: int = 1000, n_items: int = 5000, *, dim: int = 8,
                 zipf_exponent: float = 1.1, session_length_mean: float = 6.0,
                 temperature: float = 0.5, skip_below_ms: int = 5000,
                 impressions: bool = False, seed: int = 0) -> None:
        self.n_users, self.n_items = n_users, n_items
        self.session_length_mean = session_length_mean
        self.temperature = temperature
        self.skip_below_ms = skip_below_ms
        self.impressions = impressions
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.item_vectors = rng.normal(size=(n_items, dim)) / np.sqrt(dim)
        self.user_tastes = rng.normal(size=(n_users, dim)) / np.sqrt(dim)
        ranks = rng.permutation(n_items) + 1
        self.popularity = ranks ** -zipf_exponent
        self.popularity /= self.popularity.sum()
        self.item_duration_ms = rng.integers(15_000, 600_000, size=n_items)
        self._popularity_cdf = np.cumsum(self.popularity)
        self._rng = rng

    def affinity(self, user: int, items: np.ndarray) -> np.ndarray:
        """Standardised taste match of ``user`` with ``items`` (about N(0, 1) at random)."""
        taste = self.user_tastes[user]
        return self.item_vectors[items] @ taste * np.sqrt(len(taste))

    def item_descriptions(self, timestamp: float) -> list[ItemRecord]:
        """Every item's description, derived from its latent vector: its two strongest
        dimensions, signed, are its categories (``d3+``, ``d0-``), so tastes (and the content
        model) have something true to find; its duration bucket is a tag."""
        strongest = np.argsort(-np.abs(self.item_vectors), axis=1)[:, :2]
        out = []
        for item, dims in enumerate(strongest.tolist()):
            signs = ["+" if self.item_vectors[item, d] > 0 else "-" for d in dims]
            minutes = int(self.item_duration_ms[item]) // 60_000
            out.append(ItemRecord(item_id=f"i{item}", timestamp=timestamp,
                                  categories=[f"d{d}{sign}" for d, sign in zip(dims, signs)],
                                  tags=["short" if minutes < 3 else "long"],
                                  title=f"Item {item}"))
        return out

    def events(self, count: int, start_ts: float, events_per_s: float = 100.0
               ) -> Iterator[Interaction]:
        """``count`` events whose timestamps advance at ``events_per_s`` from ``start_ts``."""
        rng = self._rng
        produced, session_no, clock = 0, 0, start_ts
        while produced < count:
            user = int(rng.integers(self.n_users))
            session_id = f"s{self.seed}-{session_no}"
            session_no += 1
            length = 1 + rng.poisson(self.session_length_mean - 1)
            # candidates drawn by popularity, then one per step chosen by taste (Gumbel-max)
            candidates = np.searchsorted(self._popularity_cdf, rng.random((length, 32)))
            candidates = np.minimum(candidates, self.n_items - 1)
            logits = self.affinity(user, candidates) / self.temperature
            chosen = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
            picks = candidates[np.arange(length), chosen]
            affinities = logits[np.arange(length), chosen] * self.temperature
            for pick, affinity in zip(picks.tolist(), affinities.tolist()):
                for event in self._interaction(user, pick, affinity, session_id, clock,
                                               produced):
                    yield event
                    produced += 1
                    clock += rng.exponential(1.0 / events_per_s)
                    if produced >= count:
                        return

    def _interaction(self, user: int, item: int, affinity: float, session_id: str, ts: float,
                     serial: int) -> Iterator[Interaction]:
        rng = self._rng
        uid, iid = f"u{user}", f"i{item}"
        # the serial keeps ids unique: a repeated item can fall on the same microsecond
        eid = f"{self.seed}-{user}-{item}-{ts:.6f}-{serial}"
        duration = int(self.item_duration_ms[item])
        if self.impressions:
            yield Interaction(event_id=eid + "-imp", user_id=uid, item_id=iid, type="impression",
                              timestamp=ts, session_id=session_id, position=int(rng.integers(20)))
        dwell = int(min(duration, rng.lognormal(np.log(15_000) + 0.5 * affinity, 1.0)))
        kind = "skip" if dwell < self.skip_below_ms else "click"
        yield Interaction(event_id=eid, user_id=uid, item_id=iid, type=kind, timestamp=ts,
                          session_id=session_id, dwell_ms=dwell, item_duration_ms=duration)
        if kind == "click" and affinity > 1.5:
            extra = rng.choice(["like", "add_to_cart", "purchase", None], p=[.3, .15, .05, .5])
            if extra:
                yield Interaction(event_id=f"{eid}-{extra}", user_id=uid, item_id=iid,
                                  type=str(extra), timestamp=ts + dwell / 1000.0,
                                  session_id=session_id)


MALFORMED_KINDS = ("garbage_bytes", "not_json", "missing_field", "wrong_type", "oversized_id",
                   "unknown_type", "future_timestamp", "bad_envelope_event")


def malformed_message(kind: str, n: int, like: Interaction | None = None) -> bytes:
    """A deliberately invalid ``interactions`` message of ``kind`` (demo and DLQ tests).

    ``like`` lends its item and timestamp, so the valid half of a mixed envelope fits the
    stream it is injected into (a replayed 2014 log stays in 2014).
    """
    import orjson

    good = {"event_id": f"bad-{n}", "user_id": f"u-bad-{n}",
            "item_id": like.item_id if like else "i1", "type": "click",
            "timestamp": like.timestamp if like else 1.7e9}

    if kind == "garbage_bytes":
        return bytes([0xFF, 0x00, 0xC3]) + n.to_bytes(4, "big")
    if kind == "not_json":
        return b'{"event_id": "bad-%d", "user_id": ' % n
    if kind == "missing_field":
        return orjson.dumps({k: v for k, v in good.items() if k != "item_id"})
    if kind == "wrong_type":
        return orjson.dumps({**good, "user_id": n})
    if kind == "oversized_id":
        return orjson.dumps({**good, "item_id": "x" * 300})
    if kind == "unknown_type":
        return orjson.dumps({**good, "type": "teleport"})
    if kind == "future_timestamp":
        return orjson.dumps({**good, "timestamp": 4.0e9})
    if kind == "bad_envelope_event":  # one valid and one invalid event in an envelope
        return orjson.dumps({"events": [{**good, "event_id": f"ok-{n}", "user_id": f"u-env-{n}"},
                                        {**good, "dwell_ms": -5}]})
    raise ValueError(f"unknown malformed kind {kind!r}; known: {MALFORMED_KINDS}")
