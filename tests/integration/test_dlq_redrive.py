"""``streamrec dlq`` against the real broker: the summary sends nothing; ``--redrive``
publishes what is valid now and was not applied then (an original carried in the record, and
one fetched from its source offset), once: the consumer group remembers how far it got."""

import base64
import json
import subprocess
import sys
import time

from kafka import KafkaProducer

from schemas import dlq
from schemas.events import decode_message, split_message
from tests.conftest import ROOT, settings_env
from tests.integration.kafka_helpers import read_topic
from tests.unit.test_dead_letter_redrive import envelope, event, letter


def dlq_cli(settings, *args):
    done = subprocess.run([sys.executable, "-m", "infra.cli", "dlq", *args], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def event_ids(settings, expected: int) -> list[str]:
    """The event ids in the interactions topic once it holds ``expected`` events (or more)."""
    deadline = time.monotonic() + 30
    while True:
        ids = sorted(e.event_id for record in read_topic(
            settings.kafka_bootstrap, settings.topic_interactions, 10**6, timeout_s=1.0)
            for e in decode_message(record.value))
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids


def test_dead_letters_summarised_then_redriven_once(settings):
    kafka = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    big = envelope(event(10), event(11))  # rejected whole; the record only points to it
    at = kafka.send(settings.topic_interactions, big, partition=0).get(30)
    pointed = letter(big, [None], applied=0)
    pointed.source = dlq.SourcePosition(settings.topic_interactions, 0, at.offset)
    pointed.original_omitted = True
    partly = envelope(event(0), event(1), event(2))  # 0 and 2 applied, 1 failed then
    carried = letter(partly, [1], applied=2, topic=settings.topic_interactions)
    carried.original_b64 = base64.b64encode(partly).decode()
    bad = envelope(event(20), event(21, dwell_ms=-1))  # still invalid now
    valid, problems = split_message(bad)
    still = dlq.dead_letter(bad, problems, settings.topic_interactions, 1, 0, len(valid))
    for value in (dlq.encode(pointed), dlq.encode(carried), dlq.encode(still), b"not a letter"):
        kafka.send(settings.topic_dlq, value, partition=0).get(30)

    summary = dlq_cli(settings)
    assert (summary["dead_letters"], summary["unreadable"], summary["sent"]) == (3, 1, False)
    assert summary["events_to_redrive"] == 3 and summary["events_still_invalid"] == 1
    assert summary["outcomes"] == {"re-driven": 2, "still invalid": 1}
    assert event_ids(settings, 2) == ["e10", "e11"]  # nothing sent

    redriven = dlq_cli(settings, "--redrive")
    assert (redriven["dead_letters"], redriven["events_redriven"]) == (3, 3)
    # the events that failed then, once each; e0 and e2 (applied then) are not sent again
    assert event_ids(settings, 5) == ["e1", "e10", "e10", "e11", "e11"]

    assert dlq_cli(settings, "--redrive")["dead_letters"] == 0  # the group remembers
    later = letter(envelope(event(30)), [None], applied=0, topic=settings.topic_interactions)
    later.original_b64 = base64.b64encode(envelope(event(30))).decode()
    kafka.send(settings.topic_dlq, dlq.encode(later), partition=0).get(30)
    again = dlq_cli(settings, "--redrive")
    assert (again["dead_letters"], again["events_redriven"]) == (1, 1)
    assert event_ids(settings, 6) == ["e1", "e10", "e10", "e11", "e11", "e30"]
    kafka.close()


def test_item_descriptions_valid_now_are_redriven_to_the_items_topic(settings):
    raw = json.dumps({"schema_version": 1, "items": [
        {"item_id": "m1", "timestamp": 1.7e9, "categories": ["Comedy"]},
        {"item_id": "m2", "timestamp": 1.7e9}]}).encode()
    record = letter(raw, [1], applied=1, topic=settings.topic_items)  # m2 failed then
    record.original_b64 = base64.b64encode(raw).decode()
    kafka = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    kafka.send(settings.topic_dlq, dlq.encode(record)).get(30)
    kafka.close()
    assert dlq_cli(settings, "--redrive")["events_redriven"] == 2  # an upsert: both again
    published = read_topic(settings.kafka_bootstrap, settings.topic_items, 2)
    assert sorted((r.key, json.loads(r.value)["item_id"]) for r in published) == [
        (b"m1", "m1"), (b"m2", "m2")]  # one message per description, keyed by its item


def test_dead_letters_sharing_the_last_record_batch_are_all_read(settings):
    """The embedded broker's ListOffsets answer trails a log whose last batch holds several
    records: the run's end is read from the log itself, so none of them waits for a later
    run (and an original inside such a batch is found, not called gone)."""
    kafka = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=200)
    raw = envelope(event(40), event(41))
    original = kafka.send(settings.topic_interactions, raw, partition=0)
    letters = []
    for n in range(3):  # one batch: sent within the linger
        record = letter(raw, [None], applied=0, topic=settings.topic_interactions)
        record.original_omitted = True
        letters.append(record)
    kafka.flush()
    at = original.get(30).offset
    for record in letters:
        record.source = dlq.SourcePosition(settings.topic_interactions, 0, at)
    for record in letters:
        kafka.send(settings.topic_dlq, dlq.encode(record), partition=0)
    kafka.flush()
    kafka.close()
    summary = dlq_cli(settings)
    assert summary["dead_letters"] == 3 and summary["outcomes"] == {"re-driven": 3}
