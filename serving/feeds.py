"""Feed builder: turns live state into each active user's feed, written to Redis.

Today's ranking is the skeleton's: trending (decayed to the stream's own clock) minus the items
the user has seen. Feeds follow the key contract in :mod:`schemas.keys`; serving reads model
state and never writes it.

Example
-------
>>> builder = FeedBuilder(Settings(redis_url="redis://127.0.0.1:6379/0"), client)  # doctest: +SKIP
>>> builder.refresh_round()          # rebuild feeds of users queued by the worker   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec

from infra.redis_client import TRANSIENT_REDIS_ERRORS
from infra.settings import Settings
from online_models.trending import decayed
from schemas.keys import RedisKeys


class FeedItem(msgspec.Struct):
    item_id: str
    score: float
    reason: str


class Feed(msgspec.Struct):
    """The JSON document stored at ``<prefix>:{u:<user>}:feed`` (and returned by the API)."""

    user_id: str
    items: list[FeedItem]
    recommendation_id: str
    generated_at: float
    source: str
    model_version: str = "trending-v1"


log = logging.getLogger("streamrec.feeds")
_feed_decoder = msgspec.json.Decoder(Feed)


class FeedBuilder:
    """Builds feeds from Redis state with a synchronous client. Thread-safe (no shared state)."""

    def __init__(self, settings: Settings, client) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.client = client

    def trending(self, k: int) -> list[tuple[str, float]]:
        """Top-k trending items with scores decayed to the newest event time."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zrevrange(self.keys.trending, 0, k - 1, withscores=True)
            pipe.hmget(self.keys.trending_meta, "landmark", "last_ts", "half_life_s")
            top, (landmark, last_ts, half_life) = pipe.execute()
        if not top:
            return []
        factor = float(decayed(1.0, float(landmark), float(last_ts), float(half_life)))
        return [(item.decode(), score * factor) for item, score in top]

    def compute(self, user_ids: list[str], k: int | None = None) -> list[Feed]:
        """Feeds for these users (two round trips in all), not written anywhere."""
        k = k or self.settings.feed_size
        with self.client.pipeline(transaction=False) as pipe:
            for user in user_ids:
                pipe.lrange(self.keys.user_history(user), 0, -1)
            histories = pipe.execute()
        longest = max((len(h) for h in histories), default=0)
        candidates = self.trending(k + longest)
        now = time.time()
        feeds = []
        for user, history in zip(user_ids, histories):
            seen = {item.decode() for item in history}
            items = [FeedItem(item, round(score, 6), "trending")
                     for item, score in candidates if item not in seen][:k]
            feeds.append(Feed(user_id=user, items=items, recommendation_id=uuid.uuid4().hex,
                              generated_at=now, source="trending"))
        return feeds

    def write(self, feeds: list[Feed]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for feed in feeds:
                pipe.set(self.keys.feed(feed.user_id), msgspec.json.encode(feed),
                         ex=self.settings.feed_ttl_s)
            pipe.execute()

    def read(self, user_id: str) -> Feed | None:
        """The stored feed of a user, or None."""
        raw = self.client.get(self.keys.feed(user_id))
        return _feed_decoder.decode(raw) if raw else None

    def refresh_round(self) -> int:
        """Rebuild the feeds of up to ``feed_refresh_batch`` queued users; returns how many."""
        popped = self.client.spop(self.keys.feed_queue, self.settings.feed_refresh_batch)
        if not popped:
            return 0
        users = [u.decode() for u in popped]
        self.write(self.compute(users))
        return len(users)

    def run(self, stop_event=None) -> None:
        """Refresh until ``stop_event`` is set (a ``threading.Event``); rides out Redis blips."""
        while stop_event is None or not stop_event.is_set():
            try:
                full = self.refresh_round() >= self.settings.feed_refresh_batch
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("redis unavailable in feed builder: %r", exc)
                full = False
            if not full:
                time.sleep(self.settings.feed_refresh_interval_s)
