"""A log that went backwards under Redis's progress is never skipped silently: the broker
(memory storage) is killed and restarted, the new log's offsets start at 0 while Redis holds
watermarks far beyond them. The worker holds those partitions, says why (log, Redis, the
`streamrec offsets` command) and applies nothing of them until an operator chooses where they
resume; it then restarts (exit 75, for its supervisor) and every new event applies once."""

import json
import subprocess
import sys
import time

from infra.embedded import ensure_streamrec_topics
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import ROOT, settings_env, wait_for
from tests.integration.kafka_helpers import private_broker


def applied(redis_client, keys) -> int:
    return int(redis_client.hget(keys.stats, "events_applied") or 0)


def offsets_cli(settings, *args):
    return subprocess.run([sys.executable, "-m", "infra.cli", "offsets", *args], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120)


def produce(settings, events) -> None:
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_batch_events=20) as producer:  # many messages per partition
        producer.send_many(events)
        producer.flush()


def apply_first_log(settings, redis_client, keys, worker, sim, events: int) -> list:
    """``events`` simulated events produced and applied by ``worker``."""
    first = list(sim.events(events, time.time() - 3600))
    produce(settings, first)
    wait_for(lambda: applied(redis_client, keys) == len(first), 60, "first log applied",
             proc=worker)
    return first


def wait_for_holds(redis_client, keys, worker, what: str) -> dict:
    """Every partition's hold (4), once the worker has recorded them."""
    return wait_for(lambda: len(redis_client.hgetall(keys.held_partitions)) == 4
                    and redis_client.hgetall(keys.held_partitions), 60, what, proc=worker)


def reset_and_resume(settings, redis_client, keys, worker, spawn, total: int):
    """``offsets --reset start``: the worker exits for its supervisor, a new one applies the
    rest, each event once; returns the new worker and the reset's output."""
    reset = offsets_cli(settings, "--reset", "start")
    assert reset.returncode == 0, reset.stderr
    # the worker drains and exits for its supervisor to restart it from the new watermarks
    assert worker.proc.wait(30) == 75, worker.log()
    worker = spawn(["worker", "--loglevel", "warn"], settings)
    wait_for(lambda: applied(redis_client, keys) >= total, 60,
             "the new log to apply once the operator reset its partitions", proc=worker)
    time.sleep(2)
    assert applied(redis_client, keys) == total  # once, not twice
    assert not redis_client.hgetall(keys.held_partitions)
    assert worker.proc.poll() is None
    return worker, reset


def test_a_log_that_went_backwards_holds_its_partitions_until_an_operator_resets_them(
        settings, redis_client, spawn):
    keys = RedisKeys(settings.key_prefix)
    with private_broker(settings, log_check_interval_s=1.0) as (broker, settings):
        worker = spawn(["worker", "--loglevel", "warn"], settings)
        sim = UserSimulator(60, 300, seed=4)
        first = apply_first_log(settings, redis_client, keys, worker, sim, 2000)
        assert offsets_cli(settings).returncode == 0  # every watermark fits the log

        broker.kill()  # memory storage: the restarted broker's log starts again at offset 0
        broker.start()  # same port
        ensure_streamrec_topics(settings)
        second = list(sim.events(300, time.time() - 600))
        produce(settings, second)

        # every partition's new log is shorter than what Redis applied of the old one
        held = wait_for_holds(redis_client, keys, worker,
                              "the worker to hold the partitions whose log went backwards")
        assert all(b"went backwards" in reason for reason in held.values())
        time.sleep(3)  # several check intervals: still nothing of the new log applied
        assert applied(redis_client, keys) == len(first)
        report = offsets_cli(settings)
        assert report.returncode == 1 and "went backwards" in report.stderr
        rows = [json.loads(line) for line in report.stdout.splitlines()]
        held_partitions = {int(k.decode().rsplit(":", 1)[1]) for k in held}
        assert {r["partition"] for r in rows if not r["fits"]} == held_partitions
        assert {r["partition"] for r in rows if r["held_by_worker"]} == held_partitions

        reset_and_resume(settings, redis_client, keys, worker, spawn, len(first) + len(second))


def recreate_topic(settings, topic: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    wait_for(lambda: topic_gone(settings, topic), 30, f"{topic} to be deleted")
    ensure_streamrec_topics(settings)


def topic_gone(settings, topic: str) -> bool:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        return topic not in admin.list_topics()
    finally:
        admin.close()


def test_a_recreated_topic_that_grew_past_the_watermarks_is_held_by_its_topic_id(
        settings, redis_client, spawn):
    """Offsets alone cannot tell: the new log is longer than what Redis applied of the old
    one. The topic id recorded beside the watermarks can."""
    keys = RedisKeys(settings.key_prefix)
    with private_broker(settings, log_check_interval_s=1.0) as (broker, settings):
        worker = spawn(["worker", "--loglevel", "warn"], settings)
        sim = UserSimulator(60, 300, seed=5)
        first = apply_first_log(settings, redis_client, keys, worker, sim, 1000)
        wait_for(lambda: len(redis_client.hgetall(keys.topic_ids)) == 4, 30,
                 "the topic id recorded beside every watermark", proc=worker)
        worker.stop()

        recreate_topic(settings, settings.topic_interactions)
        second = list(sim.events(4000, time.time() - 600))
        produce(settings, second)
        rows = [json.loads(line) for line in offsets_cli(settings).stdout.splitlines()]
        assert len(rows) == 4
        assert all(r["log_end"] > r["watermark"] for r in rows)  # every offset fits...
        assert not any(r["fits"] for r in rows)  # ...but the log is another topic's
        assert all(r["applied_topic_id"] != r["topic_id"] for r in rows)

        worker = spawn(["worker", "--loglevel", "warn"], settings)
        held = wait_for_holds(redis_client, keys, worker,
                              "the worker to hold every partition of the recreated topic")
        assert all(b"topic's id is now" in reason for reason in held.values())
        time.sleep(3)
        assert applied(redis_client, keys) == len(first)

        _, reset = reset_and_resume(settings, redis_client, keys, worker, spawn,
                                    len(first) + len(second))
        rows = [json.loads(line) for line in reset.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == 4
        assert all(r["fits"] and r["applied_topic_id"] == r["topic_id"] for r in rows)


def test_a_topic_recreated_under_a_running_worker_is_held_and_then_applied_once(
        settings, redis_client, spawn):
    """The running worker may fetch the new log from its old position before its next check
    (it sees no error): it applies those events, then holds every partition by topic id.
    Reset to the start, the rest applies and what it applied already is dropped by event id."""
    keys = RedisKeys(settings.key_prefix)
    with private_broker(settings, log_check_interval_s=3.0) as (broker, settings):
        worker = spawn(["worker", "--loglevel", "warn"], settings)
        sim = UserSimulator(60, 300, seed=6)
        first = apply_first_log(settings, redis_client, keys, worker, sim, 1000)
        recreate_topic(settings, settings.topic_interactions)
        second = list(sim.events(4000, time.time() - 600))
        produce(settings, second)
        held = wait_for_holds(redis_client, keys, worker,
                              "the running worker to hold the recreated topic's partitions")
        assert all(b"topic's id is now" in reason for reason in held.values())
        reset_and_resume(settings, redis_client, keys, worker, spawn, len(first) + len(second))
