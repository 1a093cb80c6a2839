"""STREAMREC_STATE_WRITER=single: one worker holds model state in memory, Redis is its read
model; a lease keeps any other worker from writing, and layouts are never mixed."""

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from state.redis_store import RedisStore, StateLayoutError, build_on_redis
from state.write_back import WriteBackStore
from stream.state import LiveState, WriterLeaseHeld
from tests.integration.test_exactly_once import apply_beside_a_replay, messages
from tests.conftest import ROOT, settings_env
from tests.state_check import assert_store_holds

MODELS = ["session", "cooc", "mf"]


def single(settings, client, lease_s=1.0):
    s = settings.model_copy(update={"state_writer": "single", "state_writer_lease_s": lease_s})
    models = build_on_redis(MODELS, client, s.key_prefix, 0, 60, 60, layout="single",
                            writer=True)
    assert all(isinstance(m.store, WriteBackStore) for m in models.values())
    return LiveState(s, client, list(models.values()))


def test_single_writer_state_equals_a_replay_and_serving_reads_it(settings, redis_client):
    memory = apply_beside_a_replay(single(settings, redis_client), messages(), MODELS)
    readers = build_on_redis(MODELS, redis_client, settings.key_prefix, layout="single")
    for name, model in memory.items():
        store = readers[name].store
        assert isinstance(store, RedisStore) and store.rows_as_strings
        assert_store_holds(store, model)
    assert redis_client.type(f"{settings.key_prefix}:m:cooc:cooc:{{i1}}") in (b"string", b"none")
    # a catalogue (up to max_items members) stays a sorted set, written member by member
    catalogue = readers["mf"].store.key("catalog", "all")
    assert redis_client.type(catalogue) == b"zset"
    assert redis_client.zcard(catalogue) == len(memory["mf"].store.rows["catalog"]["all"]) > 0
    with pytest.raises(StateLayoutError, match="STREAMREC_STATE_WRITER=single"):
        build_on_redis(MODELS, redis_client, settings.key_prefix)  # a reader set to shared


@contextmanager
def renewing(lease):
    """Renew ``lease`` every 0.2 s meanwhile, as the worker's timer does."""
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [lease.renew() for _ in iter(
        lambda: stop.wait(0.2), True)])
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_the_lease_keeps_a_second_writer_out_until_the_first_is_gone(settings, redis_client):
    batch = messages()
    first, second = single(settings, redis_client), single(settings, redis_client)
    first.apply_messages(batch[:3])
    with renewing(first.lease):
        with pytest.raises(WriterLeaseHeld, match="run one worker"):
            second.apply_messages(batch[3:6])  # waits 2 × the lease, the first renews
    # the first stops renewing (crashed or stalled): its lease lapses, the second takes over
    second.apply_messages(batch[3:6])
    with renewing(second.lease):
        with pytest.raises(WriterLeaseHeld):
            first.apply_messages(batch[6:9])  # its commit finds the lease gone, can't retake it
    marks = {m.partition: m.offset for m in batch[:6]}
    for partition, offset in marks.items():
        assert int(redis_client.get(second.keys.watermark("interactions", partition))) == offset


def test_a_restarted_static_member_takes_its_predecessors_lease_over_at_once(settings,
                                                                             redis_client):
    """Under a static group member id, the process restarted with that id takes the lease
    over without waiting for it to lapse; any other writer still waits, and the predecessor
    holds it no more (its commits WATCH a holder name that is gone)."""
    batch = messages()
    member_a = settings.model_copy(update={"kafka_group_instance_id": "worker-a"})
    member_b = settings.model_copy(update={"kafka_group_instance_id": "worker-b"})
    first = single(member_a, redis_client)
    first.apply_messages(batch[:3])
    with renewing(first.lease):  # alive as far as the lease can tell
        with pytest.raises(WriterLeaseHeld):
            single(member_b, redis_client).apply_messages(batch[3:6])
        with pytest.raises(WriterLeaseHeld):
            single(settings, redis_client).apply_messages(batch[3:6])  # no member id
        restarted = single(member_a, redis_client)
        started = time.monotonic()
        restarted.apply_messages(batch[3:6])
        assert time.monotonic() - started < 1.0  # the lease (1 s, renewed) was not waited out
        time.sleep(0.3)  # a renewal came meanwhile: it found another holder
        assert not first.lease.held
    assert redis_client.get(first.lease.key) == restarted.lease.holder.encode()
    # woken, the predecessor does not take the lease back from its successor: it stops
    with pytest.raises(WriterLeaseHeld, match="a newer process of this static group member"):
        first.apply_messages(batch[6:9])
    assert redis_client.get(first.lease.key) == restarted.lease.holder.encode()
    for message in batch[:6]:
        assert int(redis_client.get(restarted.keys.watermark(
            "interactions", message.partition))) >= message.offset


def test_lease_renewals_beside_pipelined_commits_void_none_of_them(settings, redis_client):
    """The worker renews the lease on a timer while chunks commit. Every commit WATCHes the
    lease, so a renewal (PEXPIRE) inside a commit's WATCH … EXEC would void it: the pipeline
    would drop the writer's held state and apply the chunk again from Redis (measured: a
    single writer at 10k events/s fell seconds behind). Renewals go between commits."""
    import asyncio

    from stream.pipeline import ApplyPipeline

    state = single(settings, redis_client, lease_s=30.0)
    voided = []
    abandon = state.abandon_uncommitted
    state.abandon_uncommitted = lambda: (voided.append(1), abandon())
    batch = messages(n_events=2400)
    chunks = [batch[start:start + 2] for start in range(0, len(batch), 2)]
    renewals = []

    async def go():
        pipeline = ApplyPipeline(state, lambda result, seconds: None)
        done = asyncio.Event()

        async def renew_meanwhile():
            while not done.is_set():
                renewals.append(await pipeline.between_commits(state.lease.renew))
                await asyncio.sleep(0)

        renewer = asyncio.create_task(renew_meanwhile())
        for chunk in chunks:
            await pipeline.apply(chunk)
        await pipeline.flush()
        done.set()
        await renewer

    asyncio.run(go())
    assert len(renewals) >= len(chunks) and all(renewals)  # renewed all along, and held
    assert voided == []


def test_a_restarted_writer_reads_what_a_batch_needs_before_computing_it(settings,
                                                                       redis_client):
    """The pipeline reads a chunk (``LiveState.read``) before the previous chunk's commit
    starts and computes it meanwhile: a read in the compute step would wait behind that
    transaction. A restarted writer holds nothing, so every row, vector and window that
    learning writes is read in the read step, and computing reads nothing more."""
    batch = messages(n_events=2400)
    first = single(settings, redis_client, lease_s=0.5)
    first.apply_messages(batch[:len(batch) // 2])
    first.lease.client.delete(first.lease.key)  # it stopped: a new writer takes over
    state = single(settings, redis_client)

    def reads() -> int:
        stats = redis_client.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("mget", "get"))

    chunks = [batch[:len(batch) // 2]]
    for start in range(len(batch) // 2, len(batch), 6):
        chunks.append(batch[start:start + 6])
        prepared = state.read(chunks[-1])
        before = reads()
        state.compute(prepared)
        assert reads() == before
        assert state.commit(prepared) is not None
    # and what it wrote is what a replay of the same chunks holds
    replayed = {n: build(n) for n in ("session", "cooc")}
    mapper = SignalMapper()
    for chunk in chunks:
        signals = mapper.map([e for m in chunk for e in m.events])
        for model in replayed.values():
            model.learn(signals)
    readers = build_on_redis(MODELS, redis_client, settings.key_prefix, layout="single")
    for name, model in replayed.items():
        assert_store_holds(readers[name].store, model)


def test_model_keys_have_no_ttl_while_their_writer_holds_them_and_one_once_it_is_gone(
        settings, redis_client):
    """The single writer writes model state without TTLs and expires it itself; the writer
    that takes over gives what its predecessor wrote the TTL of its table."""
    batch = messages(n_events=600)
    first = single(settings, redis_client, lease_s=0.5)
    first.apply_messages(batch)
    pattern = f"{settings.key_prefix}:m:*"
    strings = list(redis_client.scan_iter(match=pattern, count=1000, _type="string"))
    assert len(strings) > 100 and all(redis_client.pttl(k) == -1 for k in strings)
    first.lease.client.delete(first.lease.key)  # it stopped: a new writer takes over
    second = single(settings, redis_client)
    second.apply_messages(batch)  # all applied already: nothing written again
    deadline = time.monotonic() + 30
    while any(redis_client.pttl(k) == -1 for k in strings) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(0 < redis_client.pttl(k) <= 60_000 for k in strings)


def test_expire_untimed_gives_a_retired_writers_keys_their_ttl(settings, redis_client):
    """An operator retiring the single writer for good runs `streamrec expire-untimed`."""
    first = single(settings, redis_client)
    first.apply_messages(messages(n_events=600))
    strings = list(redis_client.scan_iter(match=f"{settings.key_prefix}:m:*", count=1000,
                                          _type="string"))
    assert strings and all(redis_client.pttl(k) == -1 for k in strings)
    env = settings_env(settings.model_copy(update={"state_writer": "single",
                                                   "live_models": ",".join(MODELS)}))
    done = subprocess.run([sys.executable, "-m", "infra.cli", "expire-untimed"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    given = {line["model"]: line["keys_given_a_ttl"]
             for line in map(json.loads, done.stdout.splitlines())}
    assert set(given) == set(MODELS) and sum(given.values()) == len(strings)
    assert all(0 < redis_client.pttl(k) <= 60_000 for k in strings)
    wrong = subprocess.run([sys.executable, "-m", "infra.cli", "expire-untimed"], cwd=ROOT,
                           env={**env, "STREAMREC_STATE_WRITER": "shared"},
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "STREAMREC_STATE_WRITER=single" in wrong.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "infra.cli", "expire-untimed"], cwd=ROOT, capture_output=True,
        env={**env, "STREAMREC_REDIS_URL": "redis://127.0.0.1:1"}, text=True, timeout=60)
    assert unreachable.returncode == 2
    assert unreachable.stderr.count("\n") == 1 and "127.0.0.1:1" in unreachable.stderr


def test_rules_counted_by_a_writer_get_their_ttl_once_a_writer_that_reads_them_takes_over(
        settings, redis_client):
    """Switching STREAMREC_SESSION_RULES from written to read: the next writer writes no
    `sr` row, and gives the rows its predecessor counted their table's TTL."""
    def writer(rules: str) -> LiveState:
        return LiveState.for_worker(settings.model_copy(update={
            "state_writer": "single", "state_writer_lease_s": 0.5, "live_models": "session",
            "session_rules": rules, "user_state_ttl_s": 60, "item_state_ttl_s": 60}))

    batch = messages(n_events=600)
    first = writer("written")
    first.apply_messages(batch)
    rules = list(redis_client.scan_iter(match=f"{settings.key_prefix}:m:session:sr:*",
                                        count=1000))
    assert len(rules) > 10 and all(redis_client.pttl(k) == -1 for k in rules)
    first.lease.client.delete(first.lease.key)  # it stopped: a new writer takes over
    writer("read").apply_messages(batch)
    deadline = time.monotonic() + 30
    while any(redis_client.pttl(k) == -1 for k in rules) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(0 < redis_client.pttl(k) <= 60_000 for k in rules)
