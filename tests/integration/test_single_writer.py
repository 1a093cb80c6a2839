"""STREAMREC_STATE_WRITER=single: one worker holds model state in memory, Redis is its read
model; a lease keeps any other worker from writing, and layouts are never mixed."""

import threading
from contextlib import contextmanager

import pytest

from state.redis_store import RedisStore, StateLayoutError, build_on_redis
from state.write_back import WriteBackStore
from stream.state import LiveState, WriterLeaseHeld
from tests.integration.test_exactly_once import apply_beside_a_replay, messages
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
