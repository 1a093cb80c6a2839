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


def test_dead_letter_of_a_message_near_the_size_limit_fits_and_points_to_the_original():
    """An invalid message of 900 KB would make a 1.2 MB base64 record, which the producer
    refuses: the record instead names the source position, size and SHA-256 of the original."""
    import hashlib

    raw = b'{"event_id": "' + b"x" * 900_000 + b'"}'
    _, problems = split_message(raw)
    encoded = dlq.encode(dlq.dead_letter(raw, problems, "interactions", 3, 99, 0,
                                         max_bytes=1_000_000))
    assert len(encoded) <= 1_000_000
    record = dlq.decode(encoded)
    assert record.original_omitted and record.original is None and record.original_b64 == ""
    assert record.original_size == len(raw)
    assert record.original_sha256 == hashlib.sha256(raw).hexdigest()
    assert (record.source.partition, record.source.offset) == (3, 99) and record.reason
    small = dlq.dead_letter(b"nope", split_message(b"nope")[1], "t", 0, 0, 0, max_bytes=2_000)
    assert small.original == b"nope" and not small.original_omitted


def test_dead_letter_lists_a_bounded_number_of_problems():
    import orjson

    events = [{"event_id": f"e{n}", "user_id": "u" * 300, "item_id": "i", "type": "click",
               "timestamp": 1.7e9} for n in range(1000)]
    raw = orjson.dumps({"events": events})
    _, problems = split_message(raw, max_bytes=2_000_000)
    record = dlq.dead_letter(raw, problems, "t", 0, 0, 0, max_bytes=1_000_000)
    assert len(record.problems) == dlq.MAX_PROBLEMS
    assert record.problems_omitted == 1000 - dlq.MAX_PROBLEMS
    assert "1000 invalid events" in record.reason
    assert len(dlq.encode(record)) <= 1_000_000
