"""Feed builder: turns live state into each active user's feed, written to Redis.

Feeds come from the serving pipeline (:class:`serving.recommender.Recommender`) over the live
models in Redis (``STREAMREC_LIVE_MODELS``), an HNSW index tailing the item-vector topic,
and trending; exploration takes the reserved positions. Every served list is first logged to
the impressions topic (recommendation id, policy, model version, per-position propensities),
then written under the key contract of :mod:`schemas.keys`. Serving never writes model state.

Example
-------
>>> builder = FeedBuilder(Settings(redis_url="redis://127.0.0.1:6379/0"), client)  # doctest: +SKIP
>>> builder.refresh_round()          # rebuild feeds of users queued by the worker   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from functools import lru_cache

import numpy as np
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from infra.redis_client import (TRANSIENT_REDIS_ERRORS, SkippedWrites, mget_any,
                                note_redis_error)
from infra.settings import Settings
from online_models.registry import build
from online_models.store import RowCache
from state.redis_store import apply_commands, build_live_models
from online_models.trending import decayed
from schemas import impressions
from schemas.feeds import Feed
from schemas.feeds import decode as decode_feed
from schemas.feeds import encode as encode_feed
from schemas.keys import RedisKeys
from serving.ann import AnnIndex
from serving.explore import EpsilonGreedy, ThompsonSampling
from serving.neighbour_rows import NeighbourhoodPublisher, PublishedNeighbourhoods
from serving.recommender import PipelineConfig, Recommender, Request, warm_up
from serving.rerank import SOURCE_WEIGHTS, RerankPolicy


log = logging.getLogger("streamrec.feeds")

#: KEYS: the feed, the user's erasure marker. ARGV: the feed, its TTL in s, the marker as read
#: before the feed was computed ('' for none). Stores the feed only if no erasure came since.
STORE_UNLESS_ERASED_LUA = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def explorer_for(settings: Settings, counts=None):
    positions = settings.exploration_positions
    if settings.explore_policy == "epsilon-greedy":
        return EpsilonGreedy(settings.explore_epsilon, positions)
    if settings.explore_policy == "thompson-sampling":
        return ThompsonSampling(positions, counts=counts)
    return None


class ImpressionLogUnavailable(RuntimeError):
    """Kafka did not take the impression log: the lists must not be served."""


@lru_cache(maxsize=1 << 16)  # users come back: murmur2 is pure Python in aiokafka
def _key_slot(key: bytes, partitions: int) -> int:
    """The index among a topic's sorted partitions that Kafka's default partitioner gives
    ``key`` (murmur2, as every Kafka client places keyed records)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class ImpressionLogger:
    """Sends impression records and waits for Kafka's acks, within ``kafka_ack_timeout_s`` in
    all (connecting included). An aiokafka producer on an event loop thread of its own: its
    record batches are built in compiled code, one per partition per call (~28 µs of CPU a
    record in passes of 25, most of it the per-call hand-off; 34–40 µs through ``send`` per
    record; ~100 µs with kafka-python's: ``docs/benchmarks.md``). The producer starts on
    first use (a serving process starts, and serves stored feeds, while Kafka is down);
    thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = None  # touched on the loop thread only
        self._starting: asyncio.Lock | None = None  # one producer, however many lists wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def log(self, records: list[tuple[str, impressions.ImpressionLog]]) -> None:
        budget = self.settings.kafka_ack_timeout_s
        sent = asyncio.run_coroutine_threadsafe(self._send(records), self._get_loop())
        try:
            sent.result(timeout=budget)
        except concurrent.futures.TimeoutError as exc:
            sent.cancel()
            raise ImpressionLogUnavailable(
                f"impression log unavailable: no ack from Kafka within {budget:g} s") from exc
        except KafkaError as exc:
            raise ImpressionLogUnavailable(f"impression log unavailable: {exc!r}") from exc

    async def _send(self, records: list[tuple[str, impressions.ImpressionLog]]) -> None:
        async with self._starting:
            if self._producer is None:
                self._producer = await self._start()
        producer = self._producer
        topic = self.settings.topic_impressions
        partitions = sorted(await producer.partitions_for(topic))
        # one record batch per partition, keys placed as the producer's own partitioner would
        # (murmur2): ~30 µs a record through send(), a few through a batch
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for user, record in records:
            key = user.encode()
            by_partition.setdefault(partitions[_key_slot(key, len(partitions))], []).append(
                (key, impressions.encode(record)))
        acks = []
        for partition, entries in by_partition.items():
            batch = producer.create_batch()
            for key, value in entries:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ImpressionLogUnavailable(
                            f"an impression record of {len(value)} bytes exceeds a batch")
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*acks)

    async def _start(self):
        from aiokafka import AIOKafkaProducer

        timeout_ms = int(1000 * self.settings.kafka_ack_timeout_s)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
            max_request_size=self.settings.max_message_bytes, request_timeout_ms=timeout_ms,
            **self.settings.aiokafka_client_options())
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # sends what is buffered first

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop, self._starting = asyncio.new_event_loop(), asyncio.Lock()
                self._thread = threading.Thread(target=self._loop.run_forever,
                                                 name="impression-log", daemon=True)
                self._thread.start()
            return self._loop

    def close(self, timeout: float = 10) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        stopped = asyncio.run_coroutine_threadsafe(self._stop(), loop)
        try:
            stopped.result(timeout=timeout)
        except (concurrent.futures.TimeoutError, KafkaError):
            log.warning("the impression log's producer did not stop within %g s", timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=timeout)
        if not thread.is_alive():
            loop.close()


#: Live models with a candidate source of their own in the pipeline; every other live model
#: (als, history...) proposes its top list as a source named after it.
DEDICATED_SOURCES = frozenset({"session", "cooc", "mf", "content", "trending", "popularity",
                               "random"})


class FeedBuilder:
    """Builds feeds from Redis state with a synchronous client.

    ``ann`` is the item-vector index (kept fresh by :class:`serving.vector_tail.VectorTail`);
    ``impression_producer`` an :class:`ImpressionLogger` (None: lists are not logged — tests).
    """

    def __init__(self, settings: Settings, client, ann: AnnIndex | None = None,
                 impression_producer=None) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.client = client
        self._skipped_shows = SkippedWrites(log, "counting exploration shows")
        self._store_unless_erased = client.register_script(STORE_UNLESS_ERASED_LUA)
        self.impression_producer = impression_producer
        self.vector_tail = None
        self._trending_reads = RowCache(settings.serving_rows_max_age_s, max_rows=100)
        models = build_live_models(settings, client)
        if "session" in models:  # popular items' neighbour rows: once per interval
            models["session"].cache_rows(settings.serving_rows_max_age_s)
            if settings.neighbourhoods_interval_s:  # counted by the feed builder for all
                models["session"].read_published_rows(PublishedNeighbourhoods(
                    client, self.keys, settings.neighbourhoods_wanted_s))
        if ann is None and "mf" in models:
            ann = AnnIndex(models["mf"].factors, max_items=settings.ann_max_items)
        self.ann = ann
        sources = {name: model for name, model in models.items()
                   if name not in DEDICATED_SOURCES}
        self.nearline: list = []
        if settings.trainer_dir:  # the trainer's CURRENT versions (none yet: no candidates)
            from serving.nearline import NEARLINE_SOURCES, NearlineSource

            for source, model in NEARLINE_SOURCES.items():
                sources[source] = NearlineSource(settings.trainer_dir, model)
                self.nearline.append(sources[source])
        self.recommender = Recommender(
            trending=self.trending, session=models.get("session"),
            # co-occurrence: pairs counted per event where that model is live, else scored at
            # read time from the session model's state (SessionModel.similar)
            cooc=models["cooc"] if "cooc" in models else models.get("session"),
            mf=models.get("mf"), ann=ann, content=models.get("content"),
            model_sources=sources,
            explorer=explorer_for(settings, counts=self.bandit_counts),
            config=PipelineConfig(
                candidates_per_source=settings.candidates_per_source,
                policy=RerankPolicy(freshness_weight=settings.freshness_weight, source_weights={
                    **SOURCE_WEIGHTS, **settings.source_weight_overrides})),
            item_ages=self.item_ages)

    @classmethod
    def live(cls, settings: Settings, client) -> "FeedBuilder":
        """A builder wired to Kafka: impression producer, and the item-vector tail feeding the
        ANN index when MF is live; its compiled loops loaded before it serves (the API, the
        feed builder and the demo: no list waits for numba). Call :meth:`close` when done."""
        from serving.vector_tail import VectorTail

        warm_up()

        tail = None
        if "mf" in settings.live_model_names:  # the ANN source indexes MF item vectors
            tail = VectorTail.restore(build("mf").factors, settings.kafka_bootstrap,
                                      settings.topic_item_vectors,
                                      settings.kafka_client_options(),
                                      snapshot_dir=settings.ann_snapshot_dir or None,
                                      snapshot_interval_s=settings.ann_snapshot_interval_s,
                                      max_items=settings.ann_max_items)
        builder = cls(settings, client, ann=tail.index if tail else None,
                      impression_producer=ImpressionLogger(settings))
        builder.vector_tail = tail.start() if tail else None
        return builder

    def close(self) -> None:
        if self.vector_tail is not None:
            self.vector_tail.stop()
        for source in self.nearline:
            source.close()
        if self.impression_producer is not None:
            self.impression_producer.close(timeout=10)

    def trending(self, k: int) -> list[tuple[str, float]]:
        """Top-k trending items with scores decayed to the newest event time (as read up to
        ``serving_rows_max_age_s`` ago: one read per interval, not per request)."""
        return self._trending_reads.rows([str(k)], lambda ks: [self._read_trending(k)])[0]

    def _read_trending(self, k: int) -> list[tuple[str, float]]:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zrevrange(self.keys.trending, 0, k - 1, withscores=True)
            pipe.hmget(self.keys.trending_meta, "landmark", "last_ts", "half_life_s")
            top, (landmark, last_ts, half_life) = pipe.execute()
        if not top:
            return []
        factor = float(decayed(1.0, float(landmark), float(last_ts), float(half_life)))
        return [(item.decode(), score * factor) for item, score in top]

    def bandit_counts(self, items: list[str]):
        """(engagements, shows) at exploration positions, per item, from Redis."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.bandit_clicks, items)
            pipe.hmget(self.keys.bandit_shows, items)
            clicks, shows = pipe.execute()
        return (np.array([float(c or 0) for c in clicks]),
                np.array([float(s or 0) for s in shows]))

    def item_ages(self, items: list[str]) -> dict[str, float]:
        """Seconds since each item was first seen, on the stream's clock (newest event)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zmscore(self.keys.item_first_seen, items)
            pipe.hget(self.keys.trending_meta, "last_ts")
            first, now = pipe.execute()
        if now is None:
            return {}
        now = float(now)
        return {i: max(now - t, 0.0) for i, t in zip(items, first) if t is not None}

    def histories(self, user_ids: list[str], user_vectors: bool = False
                  ) -> list[tuple[str, ...]]:
        """Each user's recent items, oldest first. ``user_vectors``: MF's user vectors are
        read in the same round trip, for a pass's query vectors (where the pipeline folds
        them in: MF and its index live)."""
        mf = self.recommender.mf
        with self.client.pipeline(transaction=False) as pipe:
            for user in user_ids:
                pipe.lrange(self.keys.user_history(user), 0, -1)
            take = (mf.store.prefetch_vectors_on(pipe, "user", user_ids)
                    if user_vectors and mf is not None and self.recommender.ann is not None
                    else None)
            raw = pipe.execute()
        if take is not None:
            take(raw[len(user_ids):])
        return [tuple(item.decode() for item in reversed(h)) for h in raw[:len(user_ids)]]

    def compute(self, user_ids: list[str], k: int | None = None,
                exclude: frozenset[str] = frozenset(), source: str = "feed_builder",
                pins: tuple[tuple[int, str], ...] = ()) -> list[Feed]:
        """Feeds for these users through the serving pipeline, not written anywhere."""
        k = k or self.settings.feed_size
        requests = [Request(user, history, k, exclude, pins) for user, history in zip(
            user_ids, self.histories(user_ids, user_vectors=True))]
        return self.recommender.recommend(requests, source)

    def similar_items(self, item_id: str, k: int) -> list[dict]:
        """Co-occurrence neighbours, then ANN neighbours of the item's vector, best first."""
        out: dict[str, dict] = {}
        if self.recommender.cooc is not None:
            [row] = self.recommender.cooc.similar([item_id])
            for item, score in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]:
                out[item] = {"item_id": item, "score": round(score, 6),
                             "reason": f"viewed together with {item_id}"}
        if self.ann is not None and len(out) < k:
            vector, found = self.ann.vectors([item_id])
            if found[0]:
                items, scores = self.ann.search(vector[0], k + 1,
                                                exclude=frozenset({item_id, *out}))
                for item, score in zip(items, scores.tolist()):
                    out[item] = {"item_id": item, "score": round(score, 6),
                                 "reason": f"similar taste to {item_id}"}
        return list(out.values())[:k]

    def log_served(self, feeds: list[Feed]) -> None:
        """Log served lists: the impressions topic (acks awaited; raises on failure), then the
        exploration positions' show counts (Thompson sampling's trials)."""
        self._log_impressions(feeds)
        reserved = set(self.settings.exploration_positions)
        shows: dict[str, int] = {}
        for feed in feeds:
            for item in feed.items:
                if item.position in reserved:
                    shows[item.item_id] = shows.get(item.item_id, 0) + 1
        if shows:  # Redis full: the lists are logged, serve them
            with self._skipped_shows, self.client.pipeline(transaction=False) as pipe:
                for item, count in shows.items():
                    pipe.hincrby(self.keys.bandit_shows, item, count)
                pipe.execute()

    def _log_impressions(self, feeds: list[Feed]) -> None:
        if self.impression_producer is None:
            return
        self.impression_producer.log([
            (feed.user_id, impressions.ImpressionLog(
                feed.recommendation_id, feed.user_id, feed.policy, feed.model_version,
                feed.generated_at, [impressions.LoggedItem(i.item_id, i.position, i.propensity,
                                                           i.score, i.reason)
                                    for i in feed.items]))
            for feed in feeds])

    def erasure_markers(self, user_ids: list[str]) -> list[bytes | None]:
        """The users' erasure markers now (:meth:`schemas.keys.RedisKeys.erased`): read
        before computing their feeds, handed to :meth:`write`."""
        return mget_any(self.client, [self.keys.erased(user) for user in user_ids])

    def write(self, feeds: list[Feed], markers: list[bytes | None] | None = None) -> int:
        """Log the lists, then store them (a list is never served without its log), except a
        feed whose user was erased since ``markers`` (:meth:`erasure_markers`, read before
        the feeds were computed; None: read now). Returns how many were stored."""
        if markers is None:
            markers = self.erasure_markers([feed.user_id for feed in feeds])
        self.log_served(feeds)
        ttl, sha = self.settings.feed_ttl_s, self._store_unless_erased.sha
        commands = [("EVALSHA", sha, 2, self.keys.feed(feed.user_id),
                     self.keys.erased(feed.user_id), encode_feed(feed), ttl, marker or b"")
                    for feed, marker in zip(feeds, markers)]
        stored = apply_commands(self.client, commands, [STORE_UNLESS_ERASED_LUA])
        return sum(1 for outcome in stored if outcome)

    def read(self, user_id: str) -> Feed | None:
        """The stored feed of a user, or None."""
        raw = self.read_raw(user_id)
        return decode_feed(raw) if raw else None

    def read_raw(self, user_id: str) -> bytes | None:
        """The stored feed document as stored (JSON bytes), or None."""
        return self.client.get(self.keys.feed(user_id))

    def refresh_round(self) -> int:
        """Rebuild the feeds of up to ``feed_refresh_batch`` queued users; returns how many."""
        popped = self.client.spop(self.keys.feed_queue, self.settings.feed_refresh_batch)
        if not popped:
            return 0
        users = [u.decode() for u in popped]
        try:
            markers = self.erasure_markers(users)  # before any state is read
            self.write(self.compute(users), markers)
        except Exception:
            self.client.sadd(self.keys.feed_queue, *users)  # try these users again next round
            raise
        return len(users)

    def run(self, stop_event=None) -> None:
        """Refresh until ``stop_event`` is set (a ``threading.Event``); rides out Redis and
        Kafka blips (the users of a failed round are queued again). Publishes the item
        neighbourhoods serving asks for (:mod:`serving.neighbour_rows`) between rounds."""
        from serving import feed_metrics  # the feeds role's own (API processes do not export)

        publisher = NeighbourhoodPublisher.for_settings(self.settings, self.client)
        while stop_event is None or not stop_event.is_set():
            publishing = False
            try:  # a chunk of neighbourhoods, then a feed round: neither waits on the other
                publishing = publisher is not None and publisher.step()
                started = time.perf_counter()
                written = self.refresh_round()
                if written:
                    feed_metrics.ROUND_SECONDS.observe(time.perf_counter() - started)
                    feed_metrics.FEEDS_WRITTEN.inc(written)
                full = written >= self.settings.feed_refresh_batch
            except TRANSIENT_REDIS_ERRORS as exc:
                note_redis_error(log, "a feed round", exc)
                feed_metrics.ROUNDS_FAILED.labels("redis").inc()
                full = False
            except ImpressionLogUnavailable as exc:
                log.warning("%s; feeds wait", exc)
                feed_metrics.ROUNDS_FAILED.labels("impression_log").inc()
                full = False
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):  # after failed rounds too
                feed_metrics.QUEUED_USERS.set(self.client.scard(self.keys.feed_queue))
            if not full and not publishing:  # nothing to do until the next poll or round
                wait = self.settings.feed_refresh_interval_s
                if publisher is not None:
                    wait = min(wait, publisher.until_due() + 0.01)
                time.sleep(wait)
