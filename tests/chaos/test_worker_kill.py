"""kill -9 the worker mid-stream, restart it, finish: state equals a clean replay.

Seeded; the fault schedule (kill after N applied events) is in the test id and the log.
"""

import logging
import time

import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore, RedisStore
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for

log = logging.getLogger(__name__)
TOTAL = 6000


def applied(client, keys) -> int:
    return int(client.hget(keys.stats, "events_applied") or 0)


@pytest.mark.parametrize("kill_after", [300, 3000])
def test_kill_minus_nine_and_restart_neither_loses_nor_doubles(settings, redis_client, spawn,
                                                               kill_after):
    s = settings.model_copy(update={"live_models": "session,cooc", "worker_batch_max": 20})
    keys = RedisKeys(s.key_prefix)
    events = list(UserSimulator(80, 200, seed=kill_after).events(TOTAL, time.time() - TOTAL))
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions,
                             max_batch_events=25) as producer:
        producer.send_many(events)
    worker = spawn(["worker", "--loglevel", "warn"], s)
    wait_for(lambda: applied(redis_client, keys) >= kill_after, 60, "first events", proc=worker)
    log.info("fault schedule: kill -9 after %d applied events", applied(redis_client, keys))
    worker.kill()
    at_kill = applied(redis_client, keys)
    assert at_kill < TOTAL, "the stream finished before the kill; use a later fault point"
    restarted = spawn(["worker", "--loglevel", "warn"], s)
    wait_for(lambda: applied(redis_client, keys) >= TOTAL, 120, "the rest", proc=restarted)
    time.sleep(2)  # anything still redelivered must be skipped, not applied
    assert applied(redis_client, keys) == TOTAL  # no loss, no double count

    mapper, models = SignalMapper(), {n: build(n).bind(MemoryStore()) for n in ("session",
                                                                               "cooc")}
    for start in range(0, TOTAL, 500):  # a clean replay (these models are batch-invariant)
        signals = mapper.map(events[start:start + 500])
        for model in models.values():
            model.learn(signals)
    tables = {"session": ("sess", "sr", "df"), "cooc": ("win",)}
    for name, model in models.items():
        live = RedisStore(redis_client, s.key_prefix, name)
        for table in tables[name]:
            rows = model.store.rows[table]
            for key, got in zip(sorted(rows), live.get_rows(table, sorted(rows))):
                assert got == pytest.approx(rows[key], rel=1e-9), (name, table, key)
    # co-occurrence counts carry a forward-decay factor set by whichever event came first;
    # the normalised neighbours (what serving uses) do not
    items = sorted(models["cooc"].store.rows["cooc"])
    live_cooc = build("cooc").bind(RedisStore(redis_client, s.key_prefix, "cooc"))
    for got, want in zip(live_cooc.similar(items), models["cooc"].similar(items)):
        assert got == pytest.approx(want, rel=1e-6)
    for user in {e.user_id for e in events}:
        mine = [e.item_id for e in events if e.user_id == user][::-1][:s.history_len]
        assert [x.decode() for x in redis_client.lrange(keys.user_history(user), 0, -1)] == mine
