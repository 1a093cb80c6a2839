"""Exactly-once effects of LiveState.apply_messages on a real redis-server."""

import threading

import msgspec
import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.redis_store import RedisStore
from schemas.keys import RedisKeys
from stream.simulator import UserSimulator
from stream.state import LiveState, SourceMessage
from tests.state_check import assert_store_holds

MODELS = ("session", "cooc", "mf")


def live(settings, client, models=MODELS):
    return LiveState(settings, client, [build(n).bind(RedisStore(client, settings.key_prefix, n))
                                        for n in models])


def messages(n_events=1200, per_message=40, partitions=3, seed=12):
    events = list(UserSimulator(50, 120, seed=seed).events(n_events, 1.7e9, 2.0))
    out = []
    for n, start in enumerate(range(0, len(events), per_message)):
        out.append(SourceMessage("interactions", n % partitions, n // partitions,
                                 events[start:start + per_message]))
    return out


def as_row(value) -> dict:
    """A snapshot value as a row: sorted-set pairs or a local row's msgpack string."""
    return msgspec.msgpack.decode(value) if isinstance(value, bytes) else dict(value)


def snapshot(client, prefix):
    """Every key under the prefix with its value (the state checksum)."""
    state = {}
    for key in sorted(client.scan_iter(match=f"{prefix}:*", count=1000)):
        kind = client.type(key)
        if kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"string":
            state[key] = client.get(key)
        elif kind == b"list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"set":
            state[key] = sorted(client.smembers(key))
    return state


def trending(client, keys):
    """Decayed trending scores at the stream's clock (landmark-independent)."""
    from online_models.trending import decayed

    meta = client.hgetall(keys.trending_meta)
    return {item.decode(): decayed(score, float(meta[b"landmark"]), float(meta[b"last_ts"]),
                                   float(meta[b"half_life_s"]))
            for item, score in client.zrange(keys.trending, 0, -1, withscores=True)}


def test_redelivered_batches_change_nothing(settings, redis_client):
    state, batch = live(settings, redis_client), messages()
    for start in range(0, len(batch), 5):
        state.apply_messages(batch[start:start + 5])
    before = snapshot(redis_client, settings.key_prefix)
    stats = RedisKeys(settings.key_prefix).stats
    result = state.apply_messages(batch[:10])  # redelivery after a crash, say
    assert result.redelivered_messages == 10 and result.applied_events == 0
    after = snapshot(redis_client, settings.key_prefix)
    after.pop(stats.encode()), before.pop(stats.encode())
    assert after == before
    assert int(redis_client.hget(stats, "skipped_redelivered")) == 10


def test_producer_duplicates_at_new_offsets_are_dropped(settings, redis_client):
    state, batch = live(settings, redis_client, ()), messages(per_message=20)
    state.apply_messages(batch)
    applied = int(redis_client.hget(RedisKeys(settings.key_prefix).stats, "events_applied"))
    replayed = [SourceMessage(m.topic, m.partition, m.offset + 1000, m.events) for m in batch[:5]]
    result = state.apply_messages(replayed)
    assert result.duplicate_events == sum(len(m.events) for m in replayed)
    assert result.applied_events == 0
    assert int(redis_client.hget(RedisKeys(settings.key_prefix).stats,
                                 "events_applied")) == applied


def test_duplicates_are_found_in_each_dedup_bucket_a_batch_spans(settings, redis_client):
    """Event ids are remembered per dedup bucket (``STREAMREC_DEDUP_TTL_S`` of event time):
    a batch spanning two buckets checks and records each id in its own."""
    state, batch = live(settings, redis_client, ()), messages(per_message=20)
    spanned = {int(e.timestamp // settings.dedup_ttl_s) for m in batch for e in m.events}
    assert len(spanned) == 2
    state.apply_messages(batch)
    keys = RedisKeys(settings.key_prefix)
    for bucket in spanned:  # each id in its own bucket's set, and only there
        ids = [e.event_id for m in batch for e in m.events]
        inside = [int(e.timestamp // settings.dedup_ttl_s) == bucket
                  for m in batch for e in m.events]
        assert redis_client.smismember(keys.seen_events(bucket), ids) == inside
    again = [SourceMessage(m.topic, m.partition, m.offset + 1000, m.events) for m in batch]
    new = [SourceMessage(m.topic, m.partition, m.offset + 2000, m.events)
           for m in messages(n_events=400, per_message=20, seed=13)]
    result = state.apply_messages([*again, *new])
    assert result.duplicate_events == sum(len(m.events) for m in batch)
    assert result.applied_events == sum(len(m.events) for m in new) == 400


def test_two_workers_applying_the_same_batch_concurrently_apply_it_once(settings, redis_client):
    batch = messages(n_events=600)
    reference_settings = settings.model_copy(update={"key_prefix": settings.key_prefix + "r"})
    live(reference_settings, redis_client).apply_messages(batch)
    workers = [live(settings, redis_client) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors = []

    def run(worker):
        try:
            barrier.wait()
            for start in range(0, len(batch), 3):
                worker.apply_messages(batch[start:start + 3])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    keys = RedisKeys(settings.key_prefix)
    assert int(redis_client.hget(keys.stats, "events_applied")) == 600
    ref = RedisKeys(reference_settings.key_prefix)
    assert trending(redis_client, keys) == pytest.approx(trending(redis_client, ref), rel=1e-6)
    for name in ("session", "cooc"):  # batch-invariant models: identical to one clean pass
        a = RedisStore(redis_client, settings.key_prefix, name)
        b = RedisStore(redis_client, reference_settings.key_prefix, name)
        for table in ("isess", "sess", "df") if name == "session" else ("cooc", "mass", "win"):
            rows_b = snapshot(redis_client, b.base + f":{table}")
            rows_a = snapshot(redis_client, a.base + f":{table}")
            assert len(rows_a) == len(rows_b) > 0
            for got, want in zip(rows_a.values(), rows_b.values()):  # sums in another order
                assert as_row(got) == pytest.approx(as_row(want), rel=1e-12), (name, table)


def apply_beside_a_replay(state: LiveState, batch: list[SourceMessage], names=MODELS) -> dict:
    """Apply ``batch`` live, 4 messages at a time, while memory-store models learn the same
    batches; returns those models (the replay)."""
    memory = {n: build(n).bind(MemoryStore()) for n in names}
    mapper = SignalMapper()
    for start in range(0, len(batch), 4):
        part = batch[start:start + 4]
        state.apply_messages(part)
        signals = mapper.map([e for m in part for e in m.events])
        for model in memory.values():
            model.learn(signals)
    return memory


def test_live_model_state_equals_an_in_memory_replay_of_the_same_batches(settings, redis_client):
    memory = apply_beside_a_replay(live(settings, redis_client), messages())
    for name, model in memory.items():
        assert_store_holds(RedisStore(redis_client, settings.key_prefix, name), model)
