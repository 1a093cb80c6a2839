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
  A round goes 100 items at a time between feed rounds. Its cost grows with the items
  serving asks for, not with the API processes that read them; an item whose recent
  sessions and their items are as they were when it was last counted (the sample's
  fingerprint, ``SessionSample.fingerprints``) is not counted again: its published
  neighbourhood is kept (its TTL renewed) for up to ``STREAMREC_NEIGHBOURHOODS_RECOUNT_S``,
  the most its members' session counts and idf's N may lag. An item first counted is
  recounted after a random ½–1 of that, then after all of it, so items counted together
  (the first round) fall due in different rounds, not all in one (a round recounting every
  item costs ~3× one that does not: a tail on the core serving shares).

A published neighbourhood is at most one interval plus one round old when it is read, then
kept ``STREAMREC_SERVING_ROWS_MAX_AGE_S`` as before. With the state unchanged, lists are the
same as those counted in the process (``tests/integration/test_neighbour_rows.py``).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Sequence

from infra.logs import Every
from infra.redis_client import SkippedWrites, is_cluster, mget_any
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
        self._refused = SkippedWrites(log, "marking wanted neighbourhoods")

    def __call__(self, items: Sequence[str]) -> list[bytes | None]:
        now = time.time()
        due = [item for item in items
               if now - self._marked.get(item, -self.mark_every_s) >= self.mark_every_s]
        keys = [self.keys.neighbourhood(item) for item in items]
        if not due:
            return mget_any(self.client, keys)
        marks = dict.fromkeys(due, now)
        if is_cluster(self.client):  # the marks' set has a slot of its own: two commands
            packed = mget_any(self.client, keys)
            with self._refused:  # Redis full: reads go on, the refused are marked next time
                self.client.zadd(self.keys.neighbourhoods_wanted, marks)
                self._remember(due, now)
            return packed
        pipe = self.client.pipeline(transaction=False)  # one round trip: read and marks
        pipe.mget(keys)
        pipe.zadd(self.keys.neighbourhoods_wanted, marks)
        packed, marked = pipe.execute(raise_on_error=False)
        if isinstance(packed, Exception):
            raise packed
        with self._refused:
            if isinstance(marked, Exception):
                raise marked
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
    wanted ``max_items``) and writes them, a round every ``interval_s``. :meth:`step` does a
    chunk at a time, so a caller (the feed builder) interleaves its own work; :meth:`publish`
    does a whole round."""

    def __init__(self, model, client, keys: RedisKeys, interval_s: float, wanted_s: float,
                 max_items: int, recount_s: float = 30.0, chunk: int = 100,
                 clock=time.monotonic, seed: int | None = None) -> None:
        self.model = model  # a SessionModel of its own: it counts, never reads published rows
        self.client, self.keys = client, keys
        self.interval_s, self.wanted_s, self.max_items = interval_s, wanted_s, max_items
        self.recount_s = recount_s
        #: item → the fingerprint of the sample its published neighbourhood was counted
        #: from, when (``clock``), and the share of ``recount_s`` after which it is counted
        #: again, changed or not: ½–1, drawn, when first counted (items counted together
        #: fall due apart), then 1; items of the current and the last round only
        self._counted: dict[str, tuple[int, float, float]] = {}
        self.clock, self._random = clock, random.Random(seed)
        self.counted = self.kept = 0  # the current (or last) round's items counted, and kept
        # items counted per step: Redis runs a chunk's reads as one script each, serving no
        # one else meanwhile (500 items: 3.2 ms a script on average; 100: 1.0 ms; 50: 0.6 ms
        # but 15 % more Redis CPU in all)
        self.chunk = chunk
        self.round_s = 0.0  # the last round's duration
        self._started = -float("inf")  # the current (or last) round's start
        self._round: list[str] = []  # the current (or last) round's items
        self._written = 0  # how many of them are written
        self._ttl_ms = 0
        self._slow_rounds = Every(60)  # warned at most once a minute

    @classmethod
    def for_settings(cls, settings, client) -> "NeighbourhoodPublisher | None":
        """The publisher ``settings`` ask for (None: off, or no session model is live)."""
        from state.redis_store import build_on_redis

        if not settings.neighbourhoods_interval_s or "session" not in settings.live_model_names:
            return None
        [model] = build_on_redis(["session"], client, settings.key_prefix,
                                 layout=settings.state_writer,
                                 options=settings.model_options).values()
        # members' session counts (and idf's N) kept as serving keeps them: read once a round
        # and not once a chunk (most members recur across the items of a round)
        model.cache_rows(settings.serving_rows_max_age_s)
        return cls(model, client, RedisKeys(settings.key_prefix),
                   settings.neighbourhoods_interval_s, settings.neighbourhoods_wanted_s,
                   settings.neighbourhoods_max_items, settings.neighbourhoods_recount_s)

    def until_due(self) -> float:
        """Seconds until the next round may start (0: now, or one is in progress)."""
        if self._written < len(self._round):
            return 0.0
        return max(0.0, self._started + self.interval_s - self.clock())

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

    def step(self) -> bool:
        """Start a round where one is due, and write its next chunk; True while the round has
        chunks left."""
        if self.until_due():
            return False
        if self._written == len(self._round):  # a new round
            self._started = self.clock()
            last = set(self._round)
            self._round, self._written = self.wanted(), 0
            self._counted = {item: counted for item, counted in self._counted.items()
                             if item in last}  # bounded: those of the last round
            self.counted = self.kept = 0
            # written rows outlive three rounds: serving never finds them gone between two
            self._ttl_ms = int(3000 * max(self.interval_s, self.round_s))
        chunk = self._round[self._written:self._written + self.chunk]
        if chunk:
            self._publish(chunk)
        self._written += len(chunk)
        if self._written < len(self._round):
            return True
        self.round_s = self.clock() - self._started
        if self.round_s > self.interval_s and self._slow_rounds.due():
            log.warning("a round of %d neighbourhoods took %.2f s, over the %.2f s interval",
                        len(self._round), self.round_s, self.interval_s)
        return False

    def _publish(self, items: list[str]) -> None:
        """Write the items' neighbourhoods: counted, or (sample unchanged, counted within
        ``recount_s``) the published one's TTL renewed; counted after all where it is gone."""
        now = self.clock()
        fresh = {item: counted[0] for item in items if (counted := self._counted.get(item))
                 and now - counted[1] < self.recount_s * counted[2]}
        rows, prints = self.model.published_rows(items, fresh)
        renewed = self._write(items, rows)
        counted = [(item, fingerprint) for item, row, fingerprint in zip(items, rows, prints)
                   if row is not None]
        gone = [item for item, row, done in zip(items, rows, renewed)
                if row is None and not done]  # expired, evicted, Redis restarted
        if gone:
            rows, prints = self.model.published_rows(gone)
            self._write(gone, rows)
            counted += zip(gone, prints)
        draw, held = self._random.random, self._counted
        held.update((item, (fingerprint, now, 1.0 if item in held else 0.5 + 0.5 * draw()))
                    for item, fingerprint in counted)
        self.counted += len(counted)
        self.kept += len(items) - len(counted)

    def _write(self, items: list[str], rows: list[bytes | None]) -> list:
        """SET each item's packed row, or renew the TTL of its published one (None); returns
        the replies (a renewal's: whether the row was there)."""
        with self.client.pipeline(transaction=False) as pipe:
            for item, row in zip(items, rows):
                if row is None:
                    pipe.pexpire(self.keys.neighbourhood(item), self._ttl_ms)
                else:
                    pipe.set(self.keys.neighbourhood(item), row, px=self._ttl_ms)
            return pipe.execute()

    def publish(self) -> int:
        """A whole round now; returns how many neighbourhoods it published (counted, or
        kept)."""
        self._started = -float("inf")
        while self.step():
            pass
        return len(self._round)
