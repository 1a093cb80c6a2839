"""Poison messages: none can stop ingest, each becomes a dead letter that fits the DLQ topic,
and the valid events queued behind it on the same partition apply (real worker and broker)."""

import hashlib
import time

from kafka import KafkaProducer

from schemas import dlq
from schemas.events import encode_event
from schemas.keys import RedisKeys
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.integration.kafka_helpers import read_topic

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
