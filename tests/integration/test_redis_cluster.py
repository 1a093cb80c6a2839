"""On a real Redis Cluster (3 primaries: redis-server --cluster-enabled, redis-cli --cluster
create): the single writer's commits spread over every node and equal a replay, a commit that
stops half applied is completed from its redo record (nothing lost, nothing added twice), the
shared layout is refused, worker → feed builder → HTTP runs end to end, and the single
writer rides out a primary's failover to its replica."""

import asyncio
import logging
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import redis

import state.redis_store
from infra.embedded import EmbeddedRedisCluster
from infra.redis_client import mget_any, mset_any, sync_redis
from state.redis_store import ClaimWindowPassed, StateLayoutError, build_on_redis
from stream.pipeline import ApplyPipeline
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from stream.state import LiveState
from tests.conftest import ROOT, settings_env, wait_for
from tests.integration.test_exactly_once import apply_beside_a_replay, messages
from tests.integration.test_pipeline_e2e import assert_feeds_built_and_served, counters
from tests.state_check import FrozenCommit, assert_store_holds, killed_mid_apply

MODELS = ["session", "cooc", "mf"]


@pytest.fixture
def cluster(redis_cluster):
    return redis_cluster


@pytest.fixture
def cluster_settings(settings, cluster):
    return settings.model_copy(update={"redis_url": cluster.url, "state_writer": "single",
                                       "state_writer_lease_s": 1.0})


@pytest.fixture
def client(cluster):
    connection = sync_redis(cluster.url)
    yield connection
    connection.close()


def single_writer(s, client, names=MODELS) -> LiveState:
    models = build_on_redis(names, client, s.key_prefix, 0, 60, 60, layout="single",
                            writer=True)
    return LiveState(s, client, list(models.values()))


def node_keys(nodes, prefix: str) -> list[list[bytes]]:
    """Each node's keys under ``prefix``."""
    out = []
    for node in nodes:
        with redis.Redis(port=node.port) as one:
            out.append(list(one.scan_iter(match=f"{prefix}:*", count=1000)))
    return out


def snapshot(nodes, prefix: str) -> dict[bytes, object]:
    """Every key under ``prefix`` (renamed to drop the prefix) with its value, but the
    bookkeeping (watermarks, seen ids, lease, redo record, seq keys, counters)."""
    state = {}
    for node, keys in zip(nodes, node_keys(nodes, prefix)):
        with redis.Redis(port=node.port) as one:
            for key in keys:
                if b":{wm}:" in key or b"{stats}" in key or key.endswith(b":seq"):
                    continue
                kind = one.type(key)
                value = (one.zrange(key, 0, -1, withscores=True) if kind == b"zset" else
                         one.lrange(key, 0, -1) if kind == b"list" else
                         one.hgetall(key) if kind == b"hash" else
                         sorted(one.smembers(key)) if kind == b"set" else one.get(key))
                if kind == b"hash":
                    value.pop(b"seq", None)
                state[key[len(prefix):]] = value
    return state


def test_the_single_writer_spreads_over_every_node_and_equals_a_replay(
        cluster_settings, client, cluster):
    s = cluster_settings
    memory = apply_beside_a_replay(single_writer(s, client), messages(), MODELS)
    readers = build_on_redis(MODELS, client, s.key_prefix, layout="single")
    for name, model in memory.items():
        assert_store_holds(readers[name].store, model)  # serving's reads, split by slot
    assert all(len(keys) > 50 for keys in node_keys(cluster.nodes, s.key_prefix))
    assert counters(client, LiveState(s, client).keys) == {"events_applied": 1200,
                                                           "batches": 8}


def test_a_commit_that_stops_half_applied_is_completed_from_its_redo_record(
        cluster_settings, client, cluster, monkeypatch):
    clean = cluster_settings.model_copy(update={"key_prefix": cluster_settings.key_prefix + "c"})
    apply_beside_a_replay(single_writer(clean, client), messages(), MODELS)

    s = cluster_settings
    live, applied = single_writer(s, client), []
    send = state.redis_store.apply_commands

    def half_then_fail(client_, commands, scripts, before_send=None, wait=None):
        applied.append(len(commands))
        if len(applied) in (3, 6):  # two commits: half their writes, then the link drops
            # (4: the redo record applied again before the retry's commit, 5)
            send(client_, commands[:len(commands) // 2], scripts, before_send, wait)
            raise redis.ConnectionError("connection lost mid-commit")
        send(client_, commands, scripts, before_send, wait)

    monkeypatch.setattr(state.redis_store, "apply_commands", half_then_fail)
    batch = messages()
    for start in range(0, len(batch), 4):
        part = batch[start:start + 4]
        try:
            live.apply_messages(part)
        except redis.ConnectionError:
            if len(applied) == 6:  # a new worker (its models' memory is read from Redis)
                live = LiveState(s, client, live.models)  # (same models: MF's sampling rng)
            assert live.apply_messages(part).redelivered_messages == len(part)
    monkeypatch.setattr(state.redis_store, "apply_commands", send)
    assert snapshot(cluster.nodes, s.key_prefix) == snapshot(cluster.nodes, clean.key_prefix)
    stats = counters(client, live.keys)
    assert stats["events_applied"] == 1200 and stats["skipped_redelivered"] == 8


def test_a_last_commit_stopped_half_applied_is_completed_when_the_next_worker_takes_over(
        cluster_settings, client, cluster, monkeypatch):
    """kill -9 between the last commit's transaction and its writes to the other nodes: no
    batch follows (the watermarks say everything was applied), so the next worker completes
    it when it takes the partitions over (the rebalance), not with a batch."""
    clean = cluster_settings.model_copy(update={"key_prefix": cluster_settings.key_prefix + "c"})
    batch = messages()
    apply_beside_a_replay(single_writer(clean, client), batch, MODELS)

    s = cluster_settings
    dying = single_writer(s, client)
    for start in range(0, len(batch) - 4, 4):
        dying.apply_messages(batch[start:start + 4])
    with killed_mid_apply(monkeypatch):
        dying.apply_messages(batch[-4:])
    client.delete(dying.keys.state_writer)  # its lease lapsed
    assert snapshot(cluster.nodes, s.key_prefix) != snapshot(cluster.nodes, clean.key_prefix)

    successor = single_writer(s, client)
    successor.prepare_to_write(sorted({(m.topic, m.partition) for m in batch}))
    assert snapshot(cluster.nodes, s.key_prefix) == snapshot(cluster.nodes, clean.key_prefix)
    assert counters(client, successor.keys)["events_applied"] == 1200


def test_a_single_writer_frozen_between_its_transaction_and_its_other_writes_sends_none(
        cluster_settings, client, cluster, monkeypatch):
    """A process restarted under the same static group member takes the lease over at once,
    while its predecessor is frozen after a commit's transaction, before its writes to the
    other nodes. The new one waits the claim window, completes the commit from the redo
    record and goes on; when the old one wakes it sends nothing (its writes would land over
    newer rows). Redis ends equal to a clean run."""
    names = ["session", "cooc"]  # (deterministic: MF samples negatives at random)
    clean = cluster_settings.model_copy(update={"key_prefix": cluster_settings.key_prefix + "c"})
    batch = messages()
    apply_beside_a_replay(single_writer(clean, client, names), batch, names)

    s = cluster_settings.model_copy(update={  # a window longer than the freeze's set-up
        "kafka_group_instance_id": "worker-1", "cluster_claim_window_s": 1.5,
        "state_writer_lease_s": 3.0})
    frozen = single_writer(s, client, names)
    for start in range(0, 8, 4):
        frozen.apply_messages(batch[start:start + 4])
    checked = time.monotonic()  # the frozen commit checks (and renews) the lease after this
    commit = FrozenCommit(monkeypatch, lambda: frozen.apply_messages(batch[8:12]))
    successor = single_writer(s, client, names)  # the restarted process, same member id
    started = time.monotonic()
    successor.apply_messages(batch[8:12])
    # took the lease over, then waited until the window had passed since that renewal
    assert time.monotonic() - checked >= 1.5 and time.monotonic() - started > 0.5
    for start in range(12, len(batch), 4):
        successor.apply_messages(batch[start:start + 4])
    written = snapshot(cluster.nodes, s.key_prefix)
    assert written == snapshot(cluster.nodes, clean.key_prefix)
    outcome = commit.wake()
    assert snapshot(cluster.nodes, s.key_prefix) == written
    assert isinstance(outcome, ClaimWindowPassed), outcome
    assert "the single writer: writes to other nodes not sent within" in str(outcome)


def test_a_restarted_member_waits_only_what_is_left_of_the_window_since_the_last_renewal(
        cluster_settings, client, caplog):
    """A process restarted under the same static member waits, after taking the lease over,
    until the claim window has passed since its predecessor last renewed it: what was left of
    the lease dates that renewal on Redis's clock, by the lease length the predecessor's name
    says (here not the successor's). A predecessor idle past the window costs no wait; one
    whose name does not say its lease length (an older version's) costs the whole window."""
    s = cluster_settings.model_copy(update={"kafka_group_instance_id": "worker-1",
                                            "cluster_claim_window_s": 1.5,
                                            "state_writer_lease_s": 30.0})
    batch = messages()
    single_writer(s, client).apply_messages(batch[:4])
    time.sleep(1.6)  # idle past the window; its lease (30 s, not renewed) holds
    restarted = single_writer(s.model_copy(update={"state_writer_lease_s": 20.0}), client)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="streamrec.state"):
        restarted.apply_messages(batch[4:8])
    assert time.monotonic() - started < 1.0
    assert "took the single-writer lease over" in caplog.text and ": no wait" in caplog.text

    client.set(restarted.keys.state_writer, f"worker-1/{uuid.uuid4().hex}", px=30_000)
    started = time.monotonic()
    single_writer(s, client).apply_messages(batch[8:12])
    assert time.monotonic() - started >= 1.5
    assert int(client.get(restarted.keys.watermark("interactions", batch[11].partition))) == (
        batch[11].offset)


def test_the_shared_layout_is_refused_on_a_cluster(cluster_settings, client):
    with pytest.raises(StateLayoutError, match="STREAMREC_STATE_WRITER=single"):
        build_on_redis(MODELS, client, cluster_settings.key_prefix)
    with pytest.raises(StateLayoutError, match="STREAMREC_STATE_WRITER=single"):
        LiveState(cluster_settings.model_copy(update={"state_writer": "shared"}), client)
    with pytest.raises(StateLayoutError, match="items agent"):
        build_on_redis(["content"], client, cluster_settings.key_prefix, layout="single")


def test_worker_feed_builder_and_api_run_on_the_cluster(cluster_settings, client, spawn):
    s = cluster_settings
    keys = LiveState(s, client).keys
    worker = spawn(["worker", "--loglevel", "warn"], s)
    events = list(UserSimulator(60, 200, seed=5).events(1500, time.time() - 1500))
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions,
                             max_batch_events=100) as producer:
        producer.send_many(events)
        producer.flush()
    wait_for(lambda: counters(client, keys).get("events_applied", 0) >= len(events), 90,
             "the worker to apply every event", proc=worker)
    assert counters(client, keys)["events_applied"] == len(events)
    users = sorted({e.user_id for e in events})
    for user in users[:10]:
        mine = [e.item_id for e in events if e.user_id == user][::-1][:s.history_len]
        assert [x.decode() for x in client.lrange(keys.user_history(user), 0, -1)] == mine

    url = assert_feeds_built_and_served(spawn, s, client, users, timeout_s=60, checked=10)
    fresh = httpx.get(f"{url}/v1/users/{users[0]}/recommendations", params={"k": 5})
    assert fresh.status_code == 200 and len(fresh.json()["items"]) == 5
    # the item neighbourhoods serving asked for are published, on whichever node holds each
    wanted = [m.decode() for m in client.zrange(keys.neighbourhoods_wanted, 0, -1)]
    assert len(wanted) > 20
    wait_for(lambda: all(client.exists(keys.neighbourhood(i)) for i in wanted), 30,
             "the feed builder to publish the wanted neighbourhoods")


def test_slots_moved_between_commits_are_followed(cluster_settings, client, cluster):
    clean = cluster_settings.model_copy(update={"key_prefix": cluster_settings.key_prefix + "c"})
    apply_beside_a_replay(single_writer(clean, client), messages(), MODELS)
    # a lease that outlasts the resharding (nothing renews it here, as the worker's timer does)
    s = cluster_settings.model_copy(update={"state_writer_lease_s": 120.0})
    live, batch = single_writer(s, client), messages()
    refused, commit = [], live.commit

    def counting_refusals(prepared):
        result = commit(prepared)
        if result is None:
            refused.append(prepared)
        return result

    live.commit = counting_refusals
    for start in range(0, len(batch), 4):
        if start in (8, 20):  # move 2,000 slots (keys included) while the writer runs
            cluster.move_slots(*((0, 1) if start == 8 else (1, 0)), slots=2000)
        live.apply_messages(batch[start:start + 4])
    assert not refused  # redis-py follows the moved slots: no commit had to be prepared again
    assert snapshot(cluster.nodes, s.key_prefix) == snapshot(cluster.nodes, clean.key_prefix)
    assert counters(client, live.keys) == {"events_applied": 1200, "batches": 8}


def test_commits_after_a_lost_redo_record_are_still_applied(cluster_settings, client, cluster):
    clean = cluster_settings.model_copy(update={"key_prefix": cluster_settings.key_prefix + "c"})
    apply_beside_a_replay(single_writer(clean, client), messages(), MODELS)
    s = cluster_settings
    live, batch = single_writer(s, client), messages()
    for start in range(0, len(batch), 4):
        if start == 16:  # an operator emptied the {wm} bookkeeping's redo record
            client.delete(live.keys.redo)
            live.lease.held = False  # as a restarted worker: the record is read again
        live.apply_messages(batch[start:start + 4])
    assert snapshot(cluster.nodes, s.key_prefix) == snapshot(cluster.nodes, clean.key_prefix)
    assert counters(client, live.keys) == {"events_applied": 1200, "batches": 8}


def test_a_role_set_to_the_shared_layout_on_a_cluster_stops_with_one_line(cluster_settings):
    env = settings_env(cluster_settings.model_copy(update={"state_writer": "shared"}))
    run = subprocess.run([sys.executable, "-m", "infra.cli", "feeds"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "STREAMREC_STATE_WRITER=single" in run.stderr


def assert_replicated(cluster) -> None:
    """Every primary's writes so far are on its replica (WAIT)."""
    for node in cluster.primaries():
        with redis.Redis(port=node.port) as one:
            assert one.wait(1, 5000) == 1


def test_the_single_writer_rides_out_a_primary_failover(settings):
    """kill -9 of a primary while the worker's pipeline applies chunks: a replica takes over
    its slots, the pipeline's retries reach it once the slot map is read again, and the state
    equals a run without the failover (nothing lost, nothing applied twice). Batch-invariant
    models only: a chunk applied again draws MF's negative samples again."""
    names = ["session", "cooc"]
    with EmbeddedRedisCluster(primaries=3, replicas=1) as cluster:
        s = settings.model_copy(update={"redis_url": cluster.url, "state_writer": "single",
                                        "state_writer_lease_s": 1.0})
        client = sync_redis(cluster.url)
        clean = s.model_copy(update={"key_prefix": s.key_prefix + "c"})
        apply_beside_a_replay(single_writer(clean, client, names), messages(), names)
        assert_replicated(cluster)  # the clean run is on the replicas before the kill
        pipeline = ApplyPipeline(single_writer(s, client, names), lambda result, _: None,
                                 retry_max_s=0.5)
        batch = messages()
        victim = cluster.primaries()[0]

        async def apply_all():
            for n, start in enumerate(range(0, len(batch), 4)):
                if n == 3:  # a commit is in flight now
                    victim.proc.send_signal(signal.SIGKILL)
                await pipeline.apply(batch[start:start + 4])
            await pipeline.flush()

        asyncio.run(asyncio.wait_for(apply_all(), timeout=60))
        primaries = cluster.primaries()
        assert len(primaries) == 3 and victim not in primaries  # a replica took over
        assert snapshot(primaries, s.key_prefix) == snapshot(primaries, clean.key_prefix)
        assert counters(client, LiveState(s, client).keys)["events_applied"] == 1200
        client.close()


def test_packed_reads_follow_the_slots_to_the_promoted_replica():
    """:func:`infra.redis_client.send_per_node` routes by its own copy of the slot map: after a
    failover, the error it raises reads the map again, so the caller's retry succeeds."""
    with EmbeddedRedisCluster(primaries=3, replicas=1) as cluster:
        client = sync_redis(cluster.url)
        keys = [f"k{n}" for n in range(200)]
        mset_any(client, {key: key for key in keys})
        assert_replicated(cluster)
        cluster.kill_primary()  # and a replica took over
        cluster.wait_ok(30)
        with pytest.raises(redis.ConnectionError):
            mget_any(client, keys)  # the map still names the dead node
        assert mget_any(client, keys) == [key.encode() for key in keys]
        client.close()


def test_a_writer_taking_over_gives_untimed_model_keys_a_ttl_on_every_node(
        cluster_settings, client, cluster):
    s, batch = cluster_settings, messages(n_events=600)
    first = single_writer(s, client)
    first.apply_messages(batch)
    pattern = f"{s.key_prefix}:m:*"
    strings = list(client.scan_iter(match=pattern, count=1000, _type="string"))
    assert all(client.pttl(k) == -1 for k in strings)  # the writer expires them itself
    assert all(any(b":m:" in k for k in keys) for keys in node_keys(cluster.nodes, s.key_prefix))
    client.delete(first.lease.key)  # it stopped: a new writer takes over
    single_writer(s, client).apply_messages(batch)  # applied already: nothing written again
    wait_for(lambda: all(0 < client.pttl(k) <= 60_000 for k in strings), 30,
             "every model key of the first writer given a TTL")
