"""STREAMREC_STATE_WRITER=owned with worker processes against the real broker and
redis-server (docs/item-ownership.md): item-side state reaches its owners through the
outboxes and the item-deltas topic, a worker group grows and loses a member to kill -9
mid-stream (on one server and on a 3-primary Redis Cluster), and nothing is lost or applied
twice."""

import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from infra.embedded import free_port
from infra.redis_client import sync_redis
from online_models.registry import build
from online_models.signals import SignalMapper
from schemas.keys import RedisKeys
from schemas.events import split_message
from state.owner_commits import hop_settled
from state.redis_store import StateLayoutError, build_live_models, build_on_redis
from stream.simulator import UserSimulator
from stream.state import LiveState, SourceMessage
from tests.conftest import ROOT, metric, settings_env, wait_for
from tests.integration.kafka_helpers import read_topic
from tests.integration.test_worker_group import produce
from tests.state_check import applied, assert_live_equals_replay

pytestmark = pytest.mark.integration


def owners_caught_up(client, s) -> bool:
    return hop_settled(client, RedisKeys(s.key_prefix), s.topic_interactions,
                       s.topic_partitions)


@pytest.mark.parametrize("redis_kind, handoff, interval_s", [
    ("server", True, 0.0), ("server", False, 0.0), ("cluster", True, 0.0),
    ("server", True, 0.3)])
def test_a_worker_group_grows_and_loses_a_member_to_kill_9_and_loses_nothing(
        settings, request, spawn, redis_kind, handoff, interval_s):
    """handoff: records for a worker's own owner partitions skip the item-deltas topic (off:
    every record goes through Kafka); interval_s: hand-offs spaced (a killed worker leaves
    records applied in its owners' memory and not committed)."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned",
                                    "worker_batch_max": 20, "owned_local_handoff": handoff,
                                    "owned_handoff_interval_s": interval_s})
    if redis_kind == "cluster":  # each source partition's part commits on its own
        s = s.model_copy(update={"redis_url": request.getfixturevalue("redis_cluster").url})
    redis_client = sync_redis(s.redis_url)
    total = 6000
    events = list(UserSimulator(120, 3000, seed=31).events(total, time.time() - total))
    metrics_port = free_port()
    first = spawn(["worker", "--loglevel", "warn"], s,
                  STREAMREC_WORKER_METRICS_PORT=str(metrics_port))
    produce(s, events[:2000])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 1000, 60, "first worker",
             proc=first)
    second = spawn(["worker", "--loglevel", "warn"], s)  # rebalance: the group grows
    produce(s, events[2000:4000])
    time.sleep(8)  # both members hold partitions now (session timeout 6 s)
    # the rebalance revoked the first's partitions: its chunks and owners' commits were in
    # Redis before it gave them up, within the limit (on a cluster it would have exited)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert metric(text, "streamrec_revocation_writes_seconds_count") >= 1
    assert first.proc.poll() is None
    taken_over = "another process had not given up"
    assert taken_over not in second.log_path.read_text()  # the first gave its claims up
    first.kill()  # kill -9 mid-stream: outbox entries and owners' memory left behind
    produce(s, events[4000:])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= total, 120, "all events",
             proc=second)
    if redis_kind == "cluster":  # the first's claims were not given up; it last checked
        claims = [line for line in second.log_path.read_text().splitlines()
                  if taken_over in line]  # them a session timeout ago: no wait
        assert claims and all("no wait" in line for line in claims), claims
    wait_for(lambda: owners_caught_up(redis_client, s), 60, "owners caught up", proc=second)
    assert applied(redis_client, s.key_prefix) == total
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=("session",), layout="owned")
    mf = build_on_redis(["mf"], redis_client, s.key_prefix, layout="owned")["mf"]  # serving's
    items = sorted({e.item_id for e in events if e.type != "impression"})
    users = sorted({e.user_id for e in events if e.type != "impression"})
    item_vectors, items_found = mf.store.get_vectors("item", items, mf.factors)
    user_vectors, users_found = mf.store.get_local_vectors("user", users, mf.factors)
    assert items_found.all() and users_found.all()
    assert np.isfinite(item_vectors).all() and np.isfinite(user_vectors).all()
    replayed = build("mf")
    replayed.learn(SignalMapper().map(events))
    assert set(mf.catalogue()) == set(replayed.catalogue())  # every item learnt positive


@pytest.mark.parametrize("handoff, interval_s", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_a_lone_worker_hands_its_records_to_its_own_owners_without_the_topic(
        settings, redis_client, spawn, handoff, interval_s):
    """One worker holds every owner partition: with the local hand-off, records go from the
    outboxes straight to its owners and the item-deltas topic stays empty; without it, all of
    them go through the topic. Either way the owners end in a replay's state. With a hand-off
    interval, the chunks committed meanwhile are handed off together: at most one hand-off
    per interval."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned",
                                    "worker_batch_max": 4, "owned_local_handoff": handoff,
                                    "owned_handoff_interval_s": interval_s})
    events = list(UserSimulator(80, 500, seed=35).events(3000, time.time() - 3000))
    metrics_port = free_port()
    worker = spawn(["worker", "--loglevel", "warn"], s,
                   STREAMREC_WORKER_METRICS_PORT=str(metrics_port))
    started = time.monotonic()
    for n in range(0, len(events), 100):  # over ~3 s: many chunks
        produce(s, events[n:n + 100])
        time.sleep(0.1)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= len(events), 60, "all events",
             proc=worker)
    wait_for(lambda: owners_caught_up(redis_client, s), 60, "owners caught up", proc=worker)
    elapsed_s = time.monotonic() - started
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=("session",), layout="owned")
    relayed = read_topic(s.kafka_bootstrap, s.topic_item_deltas, 1, 3)
    assert (relayed == []) if handoff else len(relayed) >= s.topic_partitions
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    handoffs = metric(text, "streamrec_item_delta_handoffs_total")
    if not handoff:
        assert handoffs == 0
    elif interval_s:
        assert 1 <= handoffs <= elapsed_s / interval_s + 1, (handoffs, elapsed_s)
    else:  # a hand-off as each chunk commits: many more than one per 0.5 s
        assert handoffs > elapsed_s / 0.5 + 1, (handoffs, elapsed_s)


def test_user_side_keys_go_untimed_and_those_a_killed_worker_left_get_ttls(settings,
                                                                           redis_client, spawn):
    """A worker writes its user-side keys (session rows, user vectors) without TTLs (MSET:
    a TTL per key cost Redis ~3 µs a write) and hands them to Redis's TTL once idle; keys a
    worker killed -9 left get their table's TTL from the next worker's sweep after the
    rebalance, so nothing stays untimed for good."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned",
                                    "worker_batch_max": 20})
    events = list(UserSimulator(60, 500, seed=37).events(1500, time.time() - 1500))
    first = spawn(["worker", "--loglevel", "warn"], s)
    produce(s, events[:750])
    wait_for(lambda: applied(redis_client, s.key_prefix) >= 750, 60, "events", proc=first)
    wait_for(lambda: owners_caught_up(redis_client, s), 60, "owners caught up", proc=first)
    time.sleep(2)  # the sweep as the owners started (it may give early keys a TTL) is over
    later = events[750:]
    produce(s, later)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= len(events), 60, "all events",
             proc=first)
    stores = {name: model.store for name, model in build_on_redis(
        ["session", "mf"], redis_client, s.key_prefix, layout="owned").items()}
    signals = SignalMapper().map(later)
    written = [*(stores["session"].key("sess", session) for session in
                 {e.session_id for e in later if e.type != "impression"}),
               *(stores["mf"].key("user", user) for user in
                 set(signals.users[signals.weights != 0].tolist()))]
    assert len(written) > 60
    assert {redis_client.pttl(name) for name in written} == {-1}  # MSET: no TTL
    names = [*redis_client.scan_iter(match=f"{stores['session'].base}:sess:*", count=1000),
             *redis_client.scan_iter(match=f"{stores['mf'].base}:user:*", count=1000)]
    first.kill()  # kill -9: nobody will write these keys again, or expire them
    second = spawn(["worker", "--loglevel", "warn"], s)
    ttl_ms = 1000 * s.user_state_ttl_s
    wait_for(lambda: all(0 < redis_client.pttl(name) <= ttl_ms for name in names), 60,
             "TTLs given", proc=second)


def test_models_that_claim_shared_rows_are_refused_in_the_owned_layout(redis_client, unique):
    with pytest.raises(StateLayoutError, match="'cooc' claims shared rows"):
        build_on_redis(["session", "cooc"], redis_client, f"t{unique}", layout="owned",
                       writer=True, item_partitions=4)


def test_a_writer_splitting_items_among_another_count_of_partitions_is_refused(settings,
                                                                               redis_client):
    """Item-side rows have one writer only while every worker splits items among the same
    count of owner partitions: the first owned writer records it, another count is refused
    (in one line, by the worker's command, before it starts); readers do not care."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned"})
    build_live_models(s, redis_client, writer=True)
    assert redis_client.get(RedisKeys(s.key_prefix).item_partitions) == b"4"
    other = s.model_copy(update={"topic_partitions": 6})
    with pytest.raises(StateLayoutError, match="split among 4 item partitions, this process "
                                               "runs with STREAMREC_TOPIC_PARTITIONS=6"):
        build_live_models(other, redis_client, writer=True)
    build_live_models(other, redis_client)  # serving, say
    run = subprocess.run([sys.executable, "-m", "infra.cli", "worker"],
                         env=settings_env(s.model_copy(update={"topic_partitions": 6})),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    # the item-deltas topic (4 partitions) is checked first, then what Redis holds
    assert f"the topic {s.topic_item_deltas} has 4 partitions" in run.stderr
    redis_client.set(RedisKeys(s.key_prefix).item_partitions, 6)  # as if built with 6
    run = subprocess.run([sys.executable, "-m", "infra.cli", "worker"], env=settings_env(s),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "split among 6 item partitions" in run.stderr


def test_the_outbox_a_dead_worker_left_is_relayed_by_the_next_one(settings, redis_client,
                                                                   spawn):
    """A worker committed a source partition's chunk and died before relaying its records:
    the worker that takes the partition over sends them, though no new event of it comes."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned"})
    events = list(UserSimulator(60, 400, seed=33).events(2000, time.time() - 2000))
    produce(s, events)
    records = wait_for(lambda: (lambda got: got if sum(
        len(split_message(r.value, 1 << 20)[0]) for r in got) == len(events) else None)(
        read_topic(s.kafka_bootstrap, s.topic_interactions, 1, 5)), 30, "the whole log")
    dead = LiveState(s, redis_client, list(build_live_models(s, redis_client,
                                                             writer=True).values()))
    one = [SourceMessage(r.topic, r.partition, r.offset, split_message(r.value, 1 << 20)[0])
           for r in sorted(records, key=lambda r: r.offset) if r.partition == 1]
    dead.apply_messages(one)
    outbox = RedisKeys(s.key_prefix).outbox(s.topic_interactions, 1)
    assert redis_client.hlen(outbox) >= 1  # its records, one per owner partition
    worker = spawn(["worker", "--loglevel", "warn"], s)
    wait_for(lambda: applied(redis_client, s.key_prefix) >= len(events), 60, "all events",
             proc=worker)
    wait_for(lambda: owners_caught_up(redis_client, s), 60, "owners caught up", proc=worker)
    assert_live_equals_replay(redis_client, s.key_prefix, events, s.history_len,
                              models=("session",), layout="owned")



def test_a_worker_whose_idle_partitions_another_claimed_exits(settings, spawn,
                                                              redis_cluster):
    """Owned layout on a Redis Cluster: a worker assigned partitions that no event comes for
    completes their last commits a few seconds after the assignment; where another process
    claimed them meanwhile (this one was evicted without knowing), it exits to be restarted
    (75) instead of applying their redo records (before: a warning at every tick)."""
    s = settings.model_copy(update={"live_models": "session,mf", "state_writer": "owned",
                                    "redis_url": redis_cluster.url})
    client, keys = sync_redis(s.redis_url), RedisKeys(s.key_prefix)
    writer_keys = [keys.source_writer(s.topic_interactions, p)
                   for p in range(s.topic_partitions)]
    worker = spawn(["worker", "--loglevel", "warn"], s)
    wait_for(lambda: all(client.get(key) for key in writer_keys), 60, "claims", proc=worker)
    for key in writer_keys:  # a successor, assigned the partitions, claims them
        client.set(key, b"a-successor")
    assert worker.proc.wait(30) == 75, worker.log()
    assert "was assigned to another worker" in worker.log()
