"""Poison messages: none can stop ingest, each becomes a dead letter that fits the DLQ topic,
and the valid events queued behind it on the same partition apply (real worker and broker)."""

import hashlib
import time

import msgspec
from kafka import KafkaProducer

from schemas import dlq
from schemas.events import encode_event
from schemas.keys import RedisKeys
from state.owner_commits import hop_settled
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.integration.kafka_helpers import read_topic
from tests.state_check import applied, assert_live_equals_replay

KEY = b"poisoned-user"  # every message on one partition: the valid ones queue behind the poison


def poison_messages(max_bytes: int) -> dict[str, bytes]:
    envelope_head = (b'{"events":[{"event_id":"p","user_id":"u","item_id":"i","type":"click",'
                     b'"timestamp":1.7e9,"context":{"k":')
    return {
        "nested arrays (4 KB)": b"[" * 2000 + b"]" * 2000,
        "unclosed nesting": b"{\"a\":" * 3000,
        "nesting inside an envelope's event": envelope_head + b"[" * 3000 + b"]" * 3000 + b"}}]}",
        "invalid, 0.9 of the size limit": b'{"event_id": "' + b"x" * int(0.9 * max_bytes) + b'"}',
        "over the size limit, under the topic's": b"[" + b"1," * (max_bytes // 2 + 1000) + b"1]",
    }


def test_poison_messages_are_dead_lettered_and_ingest_goes_on(settings, redis_client, spawn):
    keys = RedisKeys(settings.key_prefix)
    worker = spawn(["worker", "--loglevel", "warn"], settings)
    poisons = poison_messages(settings.max_message_bytes)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                             max_request_size=4 * settings.max_message_bytes)
    events = list(UserSimulator(1, 50, seed=5).events(200, time.time() - 600))
    for raw in poisons.values():
        producer.send(settings.topic_interactions, key=KEY, value=raw)
    for event in events:  # behind every poison, on the same partition
        producer.send(settings.topic_interactions, key=KEY, value=encode_event(event))
    producer.flush()
    producer.close()

    def stats():
        return {k.decode(): int(v) for k, v in redis_client.hgetall(keys.stats).items()}

    wait_for(lambda: stats().get("events_applied", 0) >= len(events)
             and stats().get("dlq_messages", 0) >= len(poisons), 90,
             "the events behind the poison to apply", proc=worker)
    assert worker.proc.poll() is None, worker.log()  # still running: never exited on a poison
    assert stats()["events_applied"] == len(events)
    assert stats()["dlq_messages"] == len(poisons)

    records = [dlq.decode(r.value) for r in
               read_topic(settings.kafka_bootstrap, settings.topic_dlq, len(poisons))]
    assert len(records) == len(poisons)
    by_hash = {r.original_sha256: r for r in records}
    for name, raw in poisons.items():
        record = by_hash[hashlib.sha256(raw).hexdigest()]
        assert record.reason and record.original_size == len(raw), name
        if record.original_omitted:  # too large to carry: it stays at its source position
            assert len(raw) * 4 / 3 > 0.7 * settings.max_message_bytes, name
        else:
            assert record.original == raw, name
    assert sum(r.original_omitted for r in records) == 2
    assert any("nested deeper than" in r.reason for r in records)
    assert any("exceeds the" in r.reason for r in records)


def test_what_is_not_an_item_delta_record_on_the_owners_topic_is_dead_lettered(
        settings, redis_client, spawn):
    """The owned layout's item-deltas topic is the workers' own, but anything with access
    to the broker can write to it: a message that is not an item-delta record goes to the
    dead-letter topic, and the owners go on (before: the worker exited at every restart)."""
    s = settings.model_copy(update={"state_writer": "owned", "live_models": "session"})
    worker = spawn(["worker", "--loglevel", "warn"], s)
    events = list(UserSimulator(60, 200, seed=9).events(1200, time.time() - 1200))
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    for event in events[:600]:
        producer.send(s.topic_interactions, key=event.user_id.encode(),
                      value=encode_event(event))
    producer.flush()
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 600, 90, "the first events",
             proc=worker)
    garbage = {"not msgpack": b"\xc1 not a record", "another shape": msgspec.msgpack.encode(
        [1, 2, 3]), "no source offsets": msgspec.msgpack.encode(({}, []))}
    for n, raw in enumerate(garbage.values()):  # on every owner partition, before records
        producer.send(s.topic_item_deltas, value=raw, partition=n % s.topic_partitions)
    for event in events[600:]:
        producer.send(s.topic_interactions, key=event.user_id.encode(),
                      value=encode_event(event))
    producer.flush()
    producer.close()
    wait_for(lambda: applied(redis_client, s.key_prefix) >= len(events), 90, "every event",
             proc=worker)
    wait_for(lambda: hop_settled(redis_client, RedisKeys(s.key_prefix), s.topic_interactions,
                                 s.topic_partitions), 60, "owners caught up", proc=worker)
    records = [dlq.decode(r.value) for r in read_topic(s.kafka_bootstrap, s.topic_dlq,
                                                       len(garbage))]
    assert sorted(r.original for r in records) == sorted(garbage.values())
    assert all(r.source.topic == s.topic_item_deltas and r.reason.startswith("record: ")
               for r in records), [r.reason for r in records]
    # counted where front ends read the dead letters (GET /v1/stats, the explorer)
    counted = redis_client.hget(RedisKeys(s.key_prefix).stats, "dlq_item_messages")
    assert int(counted or 0) == len(garbage)
    assert worker.proc.poll() is None, worker.log()
    assert applied(redis_client, s.key_prefix) == len(events)
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=("session",), layout="owned")
