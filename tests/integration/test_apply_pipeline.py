"""The worker's apply pipeline (stream/pipeline.py) on a real redis-server: overlapped commits
give the state of a clean replay, and a failed commit is recovered without loss or double count.
"""

import asyncio
import threading
import time

import redis

from online_models.registry import build
from state.redis_store import build_on_redis
from state.redis_store import RedisStore
from schemas.keys import RedisKeys
from stream.pipeline import ApplyPipeline
from stream.state import LiveState
from tests.integration.test_exactly_once import messages
from tests.state_check import applied, assert_live_equals_replay

MODELS = ("session", "cooc", "mf")


def worker_state(settings, client) -> LiveState:
    """A LiveState as the worker builds it: partition-local rows cached."""
    return LiveState(settings, client, list(build_on_redis(
        list(MODELS), client, settings.key_prefix, cache_local_rows=10_000).values()))


def run_pipeline(state: LiveState, chunks, flush=True) -> tuple[ApplyPipeline, list]:
    results = []

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: results.append(result))
        for chunk in chunks:
            await pipeline.apply(chunk)
        if flush:
            await pipeline.flush()
        return pipeline

    return asyncio.run(go()), results


def events_of(batch):
    return [e for m in batch for e in m.events]


def test_pipelined_commits_end_in_the_state_of_a_clean_replay(settings, redis_client):
    batch = messages(n_events=1600)
    chunks = [batch[start:start + 4] for start in range(0, len(batch), 4)]
    _, results = run_pipeline(worker_state(settings, redis_client), chunks)
    assert len(results) == len(chunks)  # each chunk accounted for once, in order
    assert sum(r.applied_events for r in results) == applied(redis_client,
                                                            settings.key_prefix) == 1600
    assert_live_equals_replay(redis_client, settings.key_prefix, events_of(batch),
                              settings.history_len)
    mf = RedisStore(redis_client, settings.key_prefix, "mf")
    items = sorted({e.item_id for e in events_of(batch)})
    _, found = mf.get_vectors("item", items, build("mf").factors)
    assert found.all()


def test_a_commit_beaten_by_another_worker_is_redone_from_redis(settings, redis_client):
    batch = messages(n_events=800)
    first, second = batch[:10], batch[10:]
    state = worker_state(settings, redis_client)

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: results.append(result))
        await pipeline.apply(first)                            # computed, not committed
        worker_state(settings, redis_client).apply_messages(batch)  # another worker: all of it
        await pipeline.apply(second)  # starts first's commit: its watermarks moved -> redone
        await pipeline.flush()

    results = []
    asyncio.run(go())
    assert [r.redelivered_messages for r in results] == [len(first), len(second)]
    assert applied(redis_client, settings.key_prefix) == 800  # once, by the other worker
    assert_live_equals_replay(redis_client, settings.key_prefix, events_of(batch),
                              settings.history_len)


def test_a_commit_failing_on_a_redis_error_is_applied_again(settings, redis_client,
                                                           monkeypatch):
    batch = messages(n_events=800)
    state = worker_state(settings, redis_client)
    commit, failures = state.commit, []

    def flaky_commit(prepared):
        if not failures:
            failures.append(prepared)
            raise redis.ConnectionError("connection reset (injected)")
        return commit(prepared)

    monkeypatch.setattr(state, "commit", flaky_commit)
    _, results = run_pipeline(state, [batch[start:start + 5] for start in range(0, 20, 5)])
    assert failures and len(results) == 4
    assert applied(redis_client, settings.key_prefix) == sum(len(m.events) for m in batch[:20])
    assert_live_equals_replay(redis_client, settings.key_prefix, events_of(batch[:20]),
                              settings.history_len)


def test_a_started_commit_lands_without_another_batch(settings, redis_client):
    batch = messages(n_events=200)
    state = worker_state(settings, redis_client)

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: None)
        await pipeline.apply(batch)
        await pipeline.start_commit()  # what the worker does at the end of a batch
        for _ in range(200):
            if applied(redis_client, settings.key_prefix) == 200:
                break
            await asyncio.sleep(0.01)
        await pipeline.settle_finished()

    asyncio.run(go())
    assert applied(redis_client, settings.key_prefix) == 200


def test_results_carry_how_old_each_applied_message_is_at_commit(settings, redis_client):
    """Freshness as the worker sees it: the Kafka time of every message whose events a chunk
    applied, and when its commit finished; redelivered and empty messages are left out."""
    batch = messages(n_events=400)
    produced = time.time() - 2.0
    for n, message in enumerate(batch):
        message.produced_at = produced + n * 0.001
    batch[3].events, batch[5].produced_at = [], None  # a dead-lettered one, one without a time
    state = worker_state(settings, redis_client)
    state.apply_messages(batch[:4])  # applied before: redelivered below
    before = time.time()
    _, results = run_pipeline(state, [batch[:6], batch[6:]])
    after = time.time()
    assert sorted(t for r in results for t in r.produced_at) == [
        m.produced_at for m in batch[4:] if m is not batch[5]]
    assert all(before <= r.committed_at <= after for r in results)  # ages: ~2 s and up


def test_a_commit_is_announced_as_soon_as_it_succeeded_before_the_pipeline_settles_it(
        settings, redis_client):
    """``on_committed`` comes while no next chunk has come (the owned layout's relay must
    not wait for one); ``on_applied`` comes when the pipeline settles the commit."""
    batch = messages(n_events=160)
    committed, applied_results = [], []

    async def go():
        pipeline = ApplyPipeline(worker_state(settings, redis_client),
                                 lambda result, seconds: applied_results.append(result),
                                 on_committed=committed.append)
        await pipeline.apply(batch)
        await pipeline.start_commit()
        deadline = time.monotonic() + 10
        while not committed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        seen_before_settling = (len(committed), len(applied_results))
        await pipeline.flush()
        return seen_before_settling

    assert asyncio.run(go()) == (1, 0)
    assert committed == applied_results and committed[0].applied_events == 160


def held_commits(state: LiveState, monkeypatch) -> threading.Event:
    """Make ``state``'s commits wait until the returned event is set (a slow Redis)."""
    release, commit = threading.Event(), state.commit

    def slow_commit(prepared):
        release.wait(30)
        return commit(prepared)

    monkeypatch.setattr(state, "commit", slow_commit)
    return release


def test_before_a_rebalance_gives_partitions_up_every_computed_chunk_is_in_redis(
        settings, redis_client, monkeypatch):
    """``finish_writes`` (run when Faust revokes the partitions) returns only once the
    commit in flight and the chunk computed after it are both written."""
    batch = messages(n_events=400)
    state = worker_state(settings, redis_client)
    release = held_commits(state, monkeypatch)

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: None)
        await pipeline.apply(batch[:8])
        await pipeline.apply(batch[8:])  # the first chunk's commit starts (held)
        finishing = asyncio.ensure_future(pipeline.finish_writes(10))
        await asyncio.sleep(0.3)
        waited = not finishing.done()
        release.set()
        return waited, await finishing

    assert asyncio.run(go()) == (True, True)
    assert applied(redis_client, settings.key_prefix) == 400  # both chunks, nothing after
    topic, partition = batch[-1].topic, batch[-1].partition
    assert int(redis_client.get(RedisKeys(settings.key_prefix).watermark(topic, partition))) \
        == max(m.offset for m in batch if m.partition == partition)


def test_writes_that_outlast_the_rebalance_limit_are_reported_and_still_land(
        settings, redis_client, monkeypatch):
    """Past its limit ``finish_writes`` says so (the worker on a Redis Cluster then exits);
    the commit goes on and a later flush settles it."""
    batch = messages(n_events=200)
    state = worker_state(settings, redis_client)
    release = held_commits(state, monkeypatch)

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: None)
        await pipeline.apply(batch)
        finished = await pipeline.finish_writes(0.2)
        before = applied(redis_client, settings.key_prefix)
        release.set()
        await pipeline.flush()
        return finished, before

    assert asyncio.run(go()) == (False, 0)
    assert applied(redis_client, settings.key_prefix) == 200
    assert_live_equals_replay(redis_client, settings.key_prefix, events_of(batch),
                              settings.history_len)
