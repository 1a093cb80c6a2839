"""Producer SDK against the real broker."""

import pytest

from schemas.events import InvalidEvent, decode_message
from stream.producer import InteractionProducer, partition_for
from stream.simulator import UserSimulator
from tests.integration.kafka_helpers import read_topic


def test_envelopes_per_partition_keep_each_users_order(settings):
    events = list(UserSimulator(40, 100, seed=8).events(1500, 1.7e9))
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_batch_events=64) as producer:
        for e in events:
            producer.send(e)
        producer.flush()
        assert producer.stats.events_sent == 1500 and producer.stats.messages_sent >= 1500 / 64
    records = read_topic(settings.kafka_bootstrap, settings.topic_interactions,
                         producer.stats.messages_sent)
    received = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        batch = decode_message(record.value)
        assert len(batch) <= 64
        assert {partition_for(e.user_id, settings.topic_partitions) for e in batch} == \
            {record.partition}
        received.extend(batch)
    assert sorted(e.event_id for e in received) == sorted(e.event_id for e in events)
    for user in {e.user_id for e in events}:
        assert [e.event_id for e in received if e.user_id == user] == \
            [e.event_id for e in events if e.user_id == user]


def test_invalid_event_raises_and_nothing_is_sent(settings):
    good = {"event_id": "e", "user_id": "u", "item_id": "i", "type": "click", "timestamp": 1.7e9}
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions) as producer:
        with pytest.raises(InvalidEvent, match="item_id"):
            producer.send_many([good, {**good, "item_id": ""}])  # all-or-nothing
        producer.flush()
        assert producer.stats.events_sent == 0
    assert read_topic(settings.kafka_bootstrap, settings.topic_interactions, 1, timeout_s=3) == []


def test_oversized_batches_are_split_to_fit_the_message_limit(settings):
    big = {"event_id": "e", "user_id": "u", "item_id": "i", "type": "click",
           "timestamp": 1.7e9, "context": {f"k{i}": "v" * 250 for i in range(16)}}
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_message_bytes=20_000, max_batch_events=1000) as producer:
        producer.send_many([{**big, "event_id": f"e{i}"} for i in range(30)])
        producer.flush()
        assert producer.stats.events_sent == 30 and producer.stats.messages_sent > 1
    for record in read_topic(settings.kafka_bootstrap, settings.topic_interactions, 2):
        assert len(record.value) <= 20_000

