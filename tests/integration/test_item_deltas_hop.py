"""Item-delta records through the real broker (state/ownership.py): an owner that reads its
partition of the item-deltas topic ends with the owners' state of an in-process replay, though
the relay sent records twice and the owner restarted from a checkpoint."""

import copy

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from infra.embedded import ensure_topics
from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.ownership import OwnedLayout, Owner, held_state
from stream.simulator import UserSimulator

pytestmark = pytest.mark.integration

PARTITIONS = 3


def _consume(bootstrap: str, topic: str, partition: int, start: int, count: int) -> list:
    """``count`` records of one partition from offset ``start``: (offset, value)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=10_000)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out = []
        for message in consumer:
            out.append((message.offset, message.value))
            if len(out) == count:
                break
        return out
    finally:
        consumer.close()


def test_records_cross_the_broker_and_each_applies_once(kafka_server, unique):
    topic = f"item-deltas-{unique}"
    ensure_topics(kafka_server.bootstrap, {topic: PARTITIONS})
    names = ("session", "mf")
    layout = OwnedLayout({name: build(name) for name in names}, PARTITIONS)
    events = list(UserSimulator(120, 250, seed=5).events(3000, 1_700_000_000.0))
    mapper = SignalMapper()
    sent = {p: 0 for p in range(PARTITIONS)}
    producer = KafkaProducer(bootstrap_servers=kafka_server.bootstrap, acks="all",
                             max_request_size=8 << 20)
    chunks = [records for records in (layout.learn(mapper.map(events[n:n + 300]))
                                      for n in range(0, len(events), 300))]
    for number, records in enumerate(chunks):
        for partition, record in records.items():
            producer.send(topic, record, partition=partition).get(timeout=30)
            sent[partition] += 1
        if number == 4:  # the relay crashed before deleting chunks 3 and 4: sends them again
            for again in chunks[3:5]:
                for partition, record in again.items():
                    producer.send(topic, record, partition=partition).get(timeout=30)
                    sent[partition] += 1
    producer.close()
    resent = sum(len(records) for records in chunks[3:5])
    assert resent > 0

    dropped = 0
    for partition in range(PARTITIONS):
        stores = {name: MemoryStore() for name in names}
        owner = Owner(stores.__getitem__)
        messages = _consume(kafka_server.bootstrap, topic, partition, 0, sent[partition])
        assert len(messages) == sent[partition]
        middle = len(messages) // 2
        outcomes = [owner.apply(value) for _, value in messages[:middle]]
        checkpoint = copy.deepcopy(stores), dict(owner.applied), messages[middle][0]
        for _, value in messages[middle:]:
            owner.apply(value)
        # restart from the checkpoint; the topic redelivers from a little before it
        stores, applied, resume_at = checkpoint
        owner = Owner(stores.__getitem__, applied)
        again = _consume(kafka_server.bootstrap, topic, partition, max(0, resume_at - 2),
                         sent[partition] - max(0, resume_at - 2))
        outcomes += [owner.apply(value) for offset, value in again if offset < resume_at]
        assert all(outcome is None for outcome in outcomes[middle:])  # applied before
        outcomes = outcomes[:middle] + [owner.apply(value) for offset, value in again
                                        if offset >= resume_at]
        dropped += sum(outcome is None for outcome in outcomes)
        replayed = layout.owner_stores[partition]
        for name in names:
            assert held_state([stores[name]]) == held_state([replayed[name]]), (partition, name)
    assert dropped == resent
