"""Reading topics back in tests (kafka-python without a consumer group: plain assign + seek)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

from kafka import KafkaConsumer, TopicPartition


def produce(settings, events, max_batch_events: int = 25) -> None:
    """Publish ``events`` to the settings' interactions topic in small envelopes (many
    messages: commits meet faults between them) and wait until all are sent."""
    from stream.producer import InteractionProducer

    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_batch_events=max_batch_events) as producer:
        producer.send_many(events)


def read_topic(bootstrap: str, topic: str, min_count: int, timeout_s: float = 30.0) -> list:
    """All records of ``topic`` once at least ``min_count`` are there (or what came in time)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=500)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < min_count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@contextmanager
def private_broker(settings, **overrides):
    """A broker of the test's own, to pause or kill, and ``settings`` pointed at it (topics
    created); stopped (and resumed first, if paused) when the block ends."""
    from infra.embedded import EmbeddedKafka, ensure_streamrec_topics

    broker = EmbeddedKafka().start()
    try:
        own = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, **overrides})
        ensure_streamrec_topics(own)
        yield broker, own
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()
