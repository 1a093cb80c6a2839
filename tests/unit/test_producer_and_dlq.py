import base64

import pytest

from schemas import dlq
from schemas.events import split_message
from stream.producer import partition_for
from stream.simulator import malformed_message


# murmur2 values from Apache Kafka's own UtilsTest (Java client): partition = toPositive(h) % n
JAVA_MURMUR2 = [("21", -973932308), ("foobar", -790332482),
                ("a-little-bit-long-string", -985981536),
                ("a-little-bit-longer-string", -1486304829),
                ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971), ("abc", 479470107)]


@pytest.mark.parametrize("key, java_hash", JAVA_MURMUR2)
@pytest.mark.parametrize("partitions", [1, 4, 7, 64])
def test_partition_matches_kafka_default_partitioner(key, java_hash, partitions):
    assert partition_for(key, partitions) == (java_hash & 0x7FFFFFFF) % partitions


def test_dead_letter_keeps_original_bytes_and_every_problem():
    raw = malformed_message("bad_envelope_event", 1)
    valid, problems = split_message(raw)
    record = dlq.decode(dlq.encode(dlq.dead_letter(raw, problems, "t", 2, 41, len(valid))))
    assert record.original == raw
    assert base64.b64decode(record.original_b64) == raw
    assert (record.source.topic, record.source.partition, record.source.offset) == ("t", 2, 41)
    assert record.valid_events_applied == 1
    assert record.problems[0].index == 1 and record.problems[0].field == "events[1].dwell_ms"
    assert "events[1].dwell_ms" in record.reason


def test_dead_letter_of_garbage_has_whole_message_reason():
    raw = malformed_message("garbage_bytes", 7)
    _, problems = split_message(raw)
    record = dlq.dead_letter(raw, problems, "t", 0, 0, 0)
    assert record.problems[0].index is None and "not JSON" in record.reason
