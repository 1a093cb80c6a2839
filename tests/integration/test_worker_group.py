"""Worker processes against the real broker and redis-server: scale-out, resume, vector topic,
metrics."""

import json
import time
import urllib.request

import numpy as np
import pytest

from infra.embedded import free_port
from online_models.registry import build
from state.redis_store import RedisStore
from schemas import vectors
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from state.owner_commits import hop_settled
from serving.vector_tail import VectorTail
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import metric, wait_for
from tests.integration.kafka_helpers import read_topic
from tests.state_check import applied, assert_live_equals_replay

pytestmark = pytest.mark.integration

#: live models per layout in these tests (the owned layout refuses cooc: it claims rows)
LAYOUT_MODELS = {"shared": "session,cooc", "single": "session,cooc", "owned": "session"}


def produce(s, events, per_message=25) -> None:
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions,
                             max_batch_events=per_message) as producer:
        producer.send_many(events)


def test_two_workers_share_partitions_and_a_rebalance_loses_nothing(settings, redis_client,
                                                                    spawn):
    s = settings.model_copy(update={"live_models": "session,cooc", "worker_batch_max": 10})
    # 3,000 items keep neighbour rows under their caps: once a shared row overflows, which tail
    # members its trim drops depends on how the two workers' batches interleave
    total = 8000
    events = list(UserSimulator(120, 3000, seed=21).events(total, time.time() - total))
    first = spawn(["worker", "--loglevel", "warn"], s)
    produce(s, events[:3000])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 1000, 60, "first worker", proc=first)
    metrics_port = free_port()
    second = spawn(["worker", "--loglevel", "warn"], s,  # rebalance 1: the group grows
                   STREAMREC_WORKER_METRICS_PORT=str(metrics_port))
    produce(s, events[3000:6000])
    time.sleep(8)  # both members hold partitions now (session timeout 6 s)
    first.stop()  # rebalance 2: the first member leaves mid-stream
    produce(s, events[6000:])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= total, 120, "all events",
             proc=second)
    time.sleep(2)
    assert applied(redis_client, s.key_prefix) == total
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len)
    # rebalance 2 revoked the second's partitions: it finished its writes before giving
    # them up (finish_writes_before_revocation), within the limit (it did not exit)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert metric(text, "streamrec_revocation_writes_seconds_count") >= 1
    assert second.proc.poll() is None


@pytest.mark.parametrize("layout", ["shared", "owned"])
def test_worker_resumes_from_redis_watermarks_when_redis_lost_writes(settings, redis_client,
                                                                      spawn, layout):
    """Kafka's committed offsets say "done"; Redis lost everything: Redis wins, state rebuilt
    (owned: the owners' records of before are dropped, their state rebuilt from new ones)."""
    s = settings.model_copy(update={"live_models": LAYOUT_MODELS[layout],
                                    "state_writer": layout})
    total = 3000
    events = list(UserSimulator(60, 150, seed=5).events(total, time.time() - total))
    produce(s, events)
    worker = spawn(["worker", "--loglevel", "warn"], s)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= total, 60, "first pass", proc=worker)
    time.sleep(4)  # let faust commit the final offsets to Kafka
    worker.stop()
    lost = list(redis_client.scan_iter(match=f"{s.key_prefix}:*", count=1000))
    redis_client.delete(*lost)  # as after restoring an empty snapshot
    restarted = spawn(["worker", "--loglevel", "info"], s)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= total, 60, "rebuild",
             proc=restarted)
    wait_for(lambda: hop_settled(redis_client, RedisKeys(s.key_prefix), s.topic_interactions,
                                 s.topic_partitions), 60, "owners caught up", proc=restarted)
    time.sleep(2)
    assert applied(redis_client, s.key_prefix) == total
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=LAYOUT_MODELS[layout].split(","), layout=layout)
    assert "resuming from Redis watermarks" in restarted.log()


@pytest.mark.parametrize("layout", ["shared", "single", "owned"])
def test_redis_losing_writes_under_a_running_worker_is_noticed_and_nothing_is_lost(
        settings, redis_client, spawn, layout):
    """Redis goes back to an older snapshot while the worker runs (a restart from an old
    snapshot, a failover to a lagging replica): the worker sees a watermark below one it
    committed, exits 75, and the restarted worker consumes the lost offsets again (owned:
    the owners drop the records sent before, and apply what the outboxes send again)."""
    s = settings.model_copy(update={"live_models": LAYOUT_MODELS[layout],
                                    "state_writer": layout, "state_writer_lease_s": 1.0})
    events = list(UserSimulator(60, 150, seed=9).events(3000, time.time() - 3000))
    worker = spawn(["worker", "--loglevel", "warn"], s)
    produce(s, events[:1000])
    settled = lambda: hop_settled(redis_client, RedisKeys(s.key_prefix),  # noqa: E731
                                  s.topic_interactions, s.topic_partitions)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 1000, 60, "first third",
             proc=worker)
    # key by key, a snapshot is one point in time (as Redis's own) only while nothing writes:
    # owned, the owners may still be applying the hop
    wait_for(settled, 60, "owners caught up", proc=worker)
    names = list(redis_client.scan_iter(match=f"{s.key_prefix}:*", count=1000))
    snapshot = {name: (redis_client.dump(name), redis_client.pttl(name)) for name in names}
    produce(s, events[1000:2000])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 2000, 60, "second third",
             proc=worker)
    wait_for(settled, 60, "owners caught up", proc=worker)  # owners idle when Redis goes back
    redis_client.delete(*redis_client.scan_iter(match=f"{s.key_prefix}:*", count=1000))
    for name, (value, ttl) in snapshot.items():  # Redis as it was after the first third
        redis_client.restore(name, max(ttl, 0), value, replace=True)
    produce(s, events[2000:])
    assert worker.proc.wait(timeout=60) == 75
    assert "went back under a running worker" in worker.log()
    restarted = spawn(["worker", "--loglevel", "info"], s)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 3000, 90, "everything",
             proc=restarted)
    wait_for(settled, 60, "owners caught up", proc=restarted)
    time.sleep(2)
    assert applied(redis_client, s.key_prefix) == 3000
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=LAYOUT_MODELS[layout].split(","), layout=s.state_writer)


def test_changed_item_vectors_reach_the_compacted_topic_and_metrics_count(settings,
                                                                          redis_client, spawn,
                                                                          tmp_path):
    s = settings.model_copy(update={"live_models": "mf", "vector_publish_interval_s": 0.2,
                                    "vector_publish_min_change": 0.0,
                                    "ann_snapshot_dir": str(tmp_path / "ann")})
    events = list(UserSimulator(40, 60, seed=3).events(1500, time.time() - 1500))
    metrics_port = free_port()
    worker = spawn(["worker", "--loglevel", "info"], s,
                   STREAMREC_WORKER_METRICS_PORT=str(metrics_port), STREAMREC_LOG_FORMAT="json")
    produce(s, events)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= len(events), 60, "events",
             proc=worker)
    mf = build("mf").bind(RedisStore(redis_client, s.key_prefix, "mf"))
    items = sorted({e.item_id for e in events if e.type != "impression"})

    def latest():
        records = read_topic(s.kafka_bootstrap, s.topic_item_vectors, len(items), 10)
        newest = {}
        for record in sorted(records, key=lambda r: (r.timestamp, r.offset)):
            newest[record.key.decode()] = vectors.decode(record.value)
        return newest

    newest = wait_for(lambda: (lambda n: n if set(items) <= set(n) else None)(latest()), 30,
                      "vectors of every item", proc=worker)
    stored, found = mf.store.get_vectors("item", items, mf.factors)
    assert found.all()
    for item, vector in zip(items, stored):
        assert newest[item].model == "mf"
        np.testing.assert_allclose(newest[item].vector, vector, rtol=1e-6)
    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()

    # the metrics count a chunk once its commit is settled: the last one up to a settle tick
    # (0.25 s) after Redis shows it
    text = wait_for(lambda: (lambda t: t if metric(t, "streamrec_events_applied_total") == len(
        events) - metric(t, "streamrec_skipped_duplicate_events_total") else None)(scrape()),
        10, "every applied event counted", proc=worker)
    assert metric(text, "streamrec_item_vectors_published_total") >= len(items)
    assert metric(text, "streamrec_messages_in_total") > 0
    ages = metric(text, "streamrec_message_age_at_commit_seconds_count")  # one per message
    assert 0 < ages <= metric(text, "streamrec_messages_in_total")
    assert 0 < metric(text, "streamrec_message_age_at_commit_seconds_sum") / ages < 60
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines()
             if line.startswith("{")]
    assert any(doc["logger"] == "streamrec.ingest" and doc["level"] == "INFO"
               and doc["message"].startswith("resuming from Redis watermarks") for doc in lines)

    # the serving side tails the topic into its ANN index
    builder = FeedBuilder.live(s, redis_client)
    try:
        wait_for(lambda: len(builder.ann) >= len(items), 30, "ANN index filled")
        indexed, found = builder.ann.vectors(items)
        assert found.all()
        np.testing.assert_allclose(indexed, stored, rtol=1e-6)
        similar = builder.similar_items(items[0], 5)
        assert len(similar) == 5 and items[0] not in {i["item_id"] for i in similar}
        assert all(i["reason"] == f"similar taste to {items[0]}" for i in similar)
        [feed] = builder.compute([events[0].user_id])
        assert any(i.reason == "for you" for i in feed.items)  # the ANN source is live
    finally:
        builder.close()  # saves the snapshot
    # a restarted serving process answers from the snapshot before reading the topic again
    restarted = VectorTail.restore(mf.factors, s.kafka_bootstrap, s.topic_item_vectors,
                                   snapshot_dir=s.ann_snapshot_dir)
    assert len(restarted.index) >= len(items) and restarted.offsets
    restored, found = restarted.index.vectors(items)
    assert found.all()
    np.testing.assert_allclose(restored, stored, rtol=1e-6)
