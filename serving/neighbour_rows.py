"""Item neighbourhoods as a nearline read model: counted once for every API process.

Serving scores session-kNN, next-item rules and read-time co-occurrence from each item's
*neighbourhood*: the items of its recent sessions, counted (``SessionModel._item_counts``:
a Lua read of the item's sessions, an MGET of their items, sparse counting). Each API process
used to count every item its lists touch again once its kept copy was a second old
(``STREAMREC_SERVING_ROWS_MAX_AGE_S``): the largest block of its CPU, repeated per process.

Here the feed builder's process counts them for all of them:

* :class:`PublishedNeighbourhoods` (every serving process) reads an item's published
  neighbourhood with one MGET per pass of lists, and marks the items it asked for as *wanted*
  (a sorted set, item → time; at most once per item every quarter of
  ``STREAMREC_NEIGHBOURHOODS_WANTED_S``). Items with none published are counted in the
  process, as before.
* :class:`NeighbourhoodPublisher` (the feed builder, ``streamrec feeds``) counts the wanted
  items' neighbourhoods every ``STREAMREC_NEIGHBOURHOODS_INTERVAL_S`` and writes them,
  packed (``SessionModel.published_rows``), with a TTL of three intervals (or three rounds,
  when a round takes longer): if it stops, serving falls back to counting within seconds.

A published neighbourhood is at most one interval plus one round old when it is read, then
kept ``STREAMREC_SERVING_ROWS_MAX_AGE_S`` as before. With the state unchanged, lists are the
same as those counted in the process (``tests/test_neighbour_rows.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from infra.redis_client import mget_any
from schemas.keys import RedisKeys

log = logging.getLogger("streamrec.neighbourhoods")


class PublishedNeighbourhoods:
    """Serving's reader (``SessionModel.read_published_rows``): the items' published
    neighbourhoods, each marked wanted for the publisher."""

    #: Past this many marks remembered, the ones older than a mark interval are forgotten.
    MAX_REMEMBERED = 200_000

    def __init__(self, client, keys: RedisKeys, wanted_s: float) -> None:
        self.client, self.keys = client, keys
        self.mark_every_s = wanted_s / 4
        self._marked: dict[str, float] = {}  # item → when this process last marked it

    def __call__(self, items: Sequence[str]) -> list[bytes | None]:
        now = time.time()
        due = [item for item in items
               if now - self._marked.get(item, -self.mark_every_s) >= self.mark_every_s]
        packed = mget_any(self.client, [self.keys.neighbourhood(item) for item in items])
        if due:
            self.client.zadd(self.keys.neighbourhoods_wanted, dict.fromkeys(due, now))
            self._remember(due, now)
        return packed

    def _remember(self, items: list[str], now: float) -> None:
        marked = self._marked
        marked.update(dict.fromkeys(items, now))
        if len(marked) > self.MAX_REMEMBERED:
            self._marked = {item: at for item, at in marked.items()
                            if now - at < self.mark_every_s}


class NeighbourhoodPublisher:
    """Counts the neighbourhoods serving asked for within ``wanted_s`` (the most recently
    wanted ``max_items``) and writes them; call :meth:`publish` every ``interval_s``
    (:meth:`due` says when)."""

    def __init__(self, model, client, keys: RedisKeys, interval_s: float, wanted_s: float,
                 max_items: int, chunk: int = 500) -> None:
        self.model = model  # a SessionModel of its own: it counts, never reads published rows
        self.client, self.keys = client, keys
        self.interval_s, self.wanted_s, self.max_items = interval_s, wanted_s, max_items
        self.chunk = chunk
        self.round_s = 0.0  # the last round's duration
        self._last = self._warned = -float("inf")

    @classmethod
    def for_settings(cls, settings, client) -> "NeighbourhoodPublisher | None":
        """The publisher ``settings`` ask for (None: off, or no session model is live)."""
        from state.redis_store import build_on_redis

        if not settings.neighbourhoods_interval_s or "session" not in settings.live_model_names:
            return None
        [model] = build_on_redis(["session"], client, settings.key_prefix,
                                 layout=settings.state_writer,
                                 options=settings.model_options).values()
        return cls(model, client, RedisKeys(settings.key_prefix),
                   settings.neighbourhoods_interval_s, settings.neighbourhoods_wanted_s,
                   settings.neighbourhoods_max_items)

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def wanted(self) -> list[str]:
        """The items wanted within ``wanted_s``, most recently wanted first; older marks (and
        those past ``max_items``) are deleted."""
        key = self.keys.neighbourhoods_wanted
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({time.time() - self.wanted_s}")
            pipe.zremrangebyrank(key, 0, -self.max_items - 1)
            pipe.zrange(key, 0, -1, desc=True)
            *_, items = pipe.execute()
        return [item.decode() for item in items]

    def publish(self) -> int:
        """One round: count every wanted item's neighbourhood and write it; returns how many."""
        started = self._last = time.monotonic()
        items = self.wanted()
        ttl_ms = int(3000 * max(self.interval_s, self.round_s))
        for at in range(0, len(items), self.chunk):
            chunk = items[at:at + self.chunk]
            with self.client.pipeline(transaction=False) as pipe:
                for item, packed in zip(chunk, self.model.published_rows(chunk)):
                    pipe.set(self.keys.neighbourhood(item), packed, px=ttl_ms)
                pipe.execute()
        self.round_s = time.monotonic() - started
        if self.round_s > self.interval_s and started - self._warned >= 60:
            self._warned = started
            log.warning("a round of %d neighbourhoods took %.2f s, over the %.2f s interval",
                        len(items), self.round_s, self.interval_s)
        return len(items)
