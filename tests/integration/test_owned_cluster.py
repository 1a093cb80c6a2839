"""STREAMREC_STATE_WRITER=owned on a real 3-primary Redis Cluster (docs/item-ownership.md):
each source partition's part of a chunk commits on its own (a redo record and a seq per
source partition), two workers' parts and the owners' commits end in a replay's state, and a
part that stopped half applied is completed by the partition's next worker: nothing lost,
nothing added twice."""

import asyncio
import time

import msgspec
import pytest
import redis

import state.redis_store
from infra.redis_client import sync_redis
from online_models.registry import build
from online_models.signals import SignalMapper
from schemas.keys import RedisKeys
from state.owner_commits import OwnerPartition, commit_owners, owner_stores, read_outboxes
from state.ownership import owner_partition
from state.redis_store import build_live_models
from state.redis_store import ClaimWindowPassed, PartitionClaimed, release_partitions
from stream.pipeline import ApplyPipeline
from stream.state import LiveState
from stream.simulator import UserSimulator
from stream.state import SourceMessage
from tests.state_check import (FrozenCommit, assert_live_equals_replay, killed_mid_apply,
                               redis_snapshot)
from tests.state_check import applied as applied_events

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture
def owned_settings(settings, redis_cluster):
    return settings.model_copy(update={"redis_url": redis_cluster.url, "state_writer": "owned",
                                       "live_models": "session,mf",
                                       "topic_partitions": PARTITIONS})


@pytest.fixture
def client(owned_settings):
    connection = sync_redis(owned_settings.redis_url)
    yield connection
    connection.close()


def messages(n_events: int, per_message: int = 40) -> list[SourceMessage]:
    """Events keyed by user, as producers send them: a user's events in one partition, in
    order; messages in the order they were produced."""
    events = list(UserSimulator(50, 120, seed=12).events(n_events, 1.7e9, 2.0))
    out: list[SourceMessage] = []
    waiting: dict[int, list] = {}
    offsets = [0] * PARTITIONS
    for event in events:
        partition = owner_partition(event.user_id, PARTITIONS)  # as Kafka places the key
        waiting.setdefault(partition, []).append(event)
        if len(waiting[partition]) == per_message:
            out.append(SourceMessage("interactions", partition, offsets[partition],
                                     waiting.pop(partition)))
            offsets[partition] += 1
    for partition, rest in sorted(waiting.items()):
        out.append(SourceMessage("interactions", partition, offsets[partition], rest))
        offsets[partition] += 1
    return out


def worker(s, client) -> LiveState:
    return LiveState(s, client, list(build_live_models(s, client, writer=True).values()))


def next_worker(s, client) -> LiveState:
    """A worker the group assigned every source partition: it claims them (as at a
    rebalance) before its first batch."""
    successor = worker(s, client)
    successor.claim_sources([("interactions", p) for p in range(PARTITIONS)])
    return successor


class Owners:
    """The relay and the owners' agent, in process: every outbox entry, in offset order,
    applied by its owner as sent, all owners committed together."""

    def __init__(self, s, client) -> None:
        self.client, self.keys = client, RedisKeys(s.key_prefix)
        self.owners = [OwnerPartition(client, s.key_prefix, p, owner_stores(s, client),
                                      claim_window_s=s.cluster_claim_window_s)
                       for p in range(PARTITIONS)]
        self.position = 0

    def catch_up(self) -> None:
        epoch, outboxes = read_outboxes(self.client, self.keys, [("interactions", p)
                                                                 for p in range(PARTITIONS)])
        for entries in outboxes.values():
            for _, owner, record in entries:
                self.position += 1
                self.owners[owner].apply_sent([epoch], [record], [self.position])
        commit_owners(self.owners)
        for partition in range(PARTITIONS):
            assert not self.client.hlen(self.keys.outbox("interactions", partition))


def assert_replay_state(s, client, batch) -> None:
    events = [e for m in batch for e in m.events]
    assert applied_events(client, s.key_prefix) == len(events)  # counted once
    assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                              models=("session",), layout="owned")
    mf = build_live_models(s.model_copy(update={"live_models": "mf"}), client)["mf"]
    replayed = build("mf")
    replayed.learn(SignalMapper().map(events))
    assert set(mf.catalogue()) == set(replayed.catalogue())


def test_two_workers_parts_and_the_owners_end_in_the_replays_state(owned_settings, client):
    s = owned_settings
    batch = messages(1500)
    first, second, owners = worker(s, client), worker(s, client), Owners(s, client)
    assert first.parted and second.parted
    mine = {0: first, 1: first, 2: second}  # the group's assignment
    for start in range(0, len(batch), 6):
        for live in (first, second):
            chunk = [m for m in batch[start:start + 6] if mine[m.partition] is live]
            if chunk:
                live.apply_messages(chunk)
        if start % 30 == 0:
            owners.catch_up()
    owners.catch_up()
    keys = RedisKeys(s.key_prefix)
    assert all(client.exists(keys.source_redo("interactions", p)) for p in range(PARTITIONS))
    assert_replay_state(s, client, batch)


def test_a_part_stopped_half_applied_is_completed_by_the_partitions_next_worker(
        owned_settings, client, monkeypatch):
    s = owned_settings
    batch = messages(1200)
    owners = Owners(s, client)
    send = state.redis_store.apply_commands
    calls = []

    def half_then_fail(client_, commands, scripts, before_send=None, wait=None):
        calls.append(len(commands))
        if len(calls) == 7:  # a part's writes outside {wm}: half sent, then the link drops
            send(client_, commands[:len(commands) // 2], scripts, before_send, wait)
            raise redis.ConnectionError("connection lost mid-commit")
        send(client_, commands, scripts, before_send, wait)

    monkeypatch.setattr(state.redis_store, "apply_commands", half_then_fail)
    dying = worker(s, client)
    with pytest.raises(redis.ConnectionError):
        for start in range(0, len(batch), 6):
            dying.apply_messages(batch[start:start + 6])
    monkeypatch.setattr(state.redis_store, "apply_commands", send)
    assert calls[6] > 2  # it stopped half way through a part's writes
    owners.catch_up()
    successor = next_worker(s, client)  # applies each partition's redo record, then goes on
    for start in range(0, len(batch), 6):  # Kafka redelivers from the start
        successor.apply_messages(batch[start:start + 6])
    owners.catch_up()
    assert_replay_state(s, client, batch)


def test_a_last_part_stopped_half_applied_is_completed_when_the_next_worker_takes_over(
        owned_settings, client, monkeypatch):
    """kill -9 in the writes of a partition's last part: nothing more comes for it (its
    watermark says it was applied), so the next worker completes it when it takes the
    partitions over (the rebalance), not with a batch."""
    s = owned_settings
    batch = messages(1200)
    owners = Owners(s, client)
    dying = worker(s, client)
    for start in range(0, len(batch) - 1, 6):
        dying.apply_messages(batch[start:min(start + 6, len(batch) - 1)])
    with killed_mid_apply(monkeypatch):
        dying.apply_messages(batch[-1:])  # one partition's part
    assert applied_events(client, s.key_prefix) < sum(len(m.events) for m in batch)

    successor = next_worker(s, client)
    successor.prepare_to_write([("interactions", p) for p in range(PARTITIONS)])
    owners.catch_up()
    assert_replay_state(s, client, batch)


def test_keys_a_redo_record_writes_get_their_tables_ttls_from_the_partitions_next_worker(
        owned_settings, client):
    """A worker gone (kill -9) leaves user-side keys without TTLs that nobody tracks; those
    its redo records name are written again by the partition's next worker when it applies
    the records, after the rebalance's sweep may have run: they get their tables' TTLs
    there."""
    s = owned_settings
    batch = messages(600)
    gone, owners = worker(s, client), Owners(s, client)
    for start in range(0, len(batch), 6):
        gone.apply_messages(batch[start:start + 6])
    keys = RedisKeys(s.key_prefix)
    named = {name for p in range(PARTITIONS) for command in msgspec.msgpack.decode(
        client.hget(keys.source_redo("interactions", p), "commands"))
        if command[0] == "MSET" for name in command[1::2]}
    user_side = [name for name in named if any(
        name.startswith(f"{store.reader.base}:") for store in gone.user_side_stores)]
    assert len(user_side) > 20 and all(client.pttl(name) == -1 for name in user_side)
    successor = next_worker(s, client)
    firsts = [next(m for m in batch if m.partition == p) for p in range(PARTITIONS)]
    successor.apply_messages(firsts)  # under the watermarks: nothing applied, records redone
    assert applied_events(client, s.key_prefix) == sum(len(m.events) for m in batch)
    ttls = [client.pttl(name) for name in user_side]
    assert all(0 < ttl <= s.user_state_ttl_s * 1000 for ttl in ttls), sorted(ttls)[:5]
    owners.catch_up()
    assert_replay_state(s, client, batch)


def test_a_worker_evicted_without_knowing_writes_nothing_once_its_successor_claimed(
        owned_settings, client):
    """A worker frozen past the session timeout: the group gave its partitions to another,
    which claimed them. Its commit of what it computed before then fails, whole: no part's
    transaction and no write to another node (they would land over its successor's), and it
    says why (the worker exits)."""
    s = owned_settings
    batch = messages(2400)  # 60 messages
    frozen, owners = worker(s, client), Owners(s, client)
    for start in range(0, 30, 3):
        frozen.apply_messages(batch[start:start + 3])
    prepared = frozen.prepare(batch[30:36])  # computed; then frozen past its session
    assert len(prepared.parts) > 1
    successor = next_worker(s, client)  # assigned the partitions; no batch of its own yet
    written = redis_snapshot(client, s.key_prefix)
    with pytest.raises(PartitionClaimed, match="assigned to another worker"):
        frozen.commit(prepared)  # (its watermarks have not moved: only the claim stops it)
    assert redis_snapshot(client, s.key_prefix) == written
    for start in range(30, len(batch), 3):
        successor.apply_messages(batch[start:start + 3])
    owners.catch_up()
    assert_replay_state(s, client, batch)


def test_a_worker_frozen_between_its_transaction_and_its_other_writes_sends_none_of_them(
        owned_settings, client, monkeypatch):
    """The window a claim alone leaves open: frozen after a part's transaction, before its
    writes to the other nodes. Its successor claims the partitions (waiting out the claim
    window: the frozen worker never gave them up), completes the part from its redo record
    and goes on; when the frozen worker wakes, it sends nothing (those writes would land over
    the successor's newer rows) and says why. Redis ends in the replay's state."""
    s = owned_settings.model_copy(update={"cluster_claim_window_s": 1.5})  # > the freeze's set-up
    batch = messages(2400)
    frozen, owners = worker(s, client), Owners(s, client)
    for start in range(0, 30, 3):
        frozen.apply_messages(batch[start:start + 3])
    checked = time.monotonic()  # the frozen commit checks its claim after this
    commit = FrozenCommit(monkeypatch, lambda: frozen.apply_messages(batch[30:36]))
    started = time.monotonic()
    successor = next_worker(s, client)  # the group gave it the partitions: it claims them
    # not given up: it waited until the window had passed since the frozen commit's check
    assert time.monotonic() - checked >= 1.5 and time.monotonic() - started > 0.5
    for start in range(30, len(batch), 3):
        successor.apply_messages(batch[start:start + 3])
    owners.catch_up()
    written = redis_snapshot(client, s.key_prefix)
    outcome = commit.wake()
    assert redis_snapshot(client, s.key_prefix) == written
    assert_replay_state(s, client, batch)
    assert isinstance(outcome, ClaimWindowPassed), outcome
    assert "not sent within" in str(outcome)
    with pytest.raises(PartitionClaimed):  # its retry checks the claim again: it exits
        frozen.apply_messages(batch[30:36])
    assert redis_snapshot(client, s.key_prefix) == written


def test_writes_stalled_past_the_claim_window_go_out_after_a_fresh_check(owned_settings, client,
                                                                          monkeypatch):
    """A part's writes to other nodes that could not go out within the claim window (Redis
    stalled: a primary failing over) are not sent then. The pipeline tries the chunk again
    as after a Redis error; the next try checks the claim again (this process still holds
    it), applies the redo record as the writer and goes on: no exit, the replay's state."""
    s = owned_settings
    batch = messages(900)
    live, owners = next_worker(s, client), Owners(s, client)
    send, stalled = state.redis_store.apply_commands, []

    def stalled_once(client_, commands, scripts, before_send=None, wait=None):
        if before_send is not None and not stalled:
            stalled.append(len(commands))
            time.sleep(s.cluster_claim_window_s + 0.2)
        return send(client_, commands, scripts, before_send, wait)

    monkeypatch.setattr(state.redis_store, "apply_commands", stalled_once)
    moved = []
    pipeline = ApplyPipeline(live, lambda result, seconds: None, retry_max_s=0.2,
                             on_moved=moved.append)

    async def apply_all():
        for start in range(0, len(batch), 3):
            await pipeline.apply(batch[start:start + 3])
        await pipeline.flush()

    asyncio.run(asyncio.wait_for(apply_all(), timeout=60))
    assert stalled and not moved and pipeline.redone_chunks >= 1
    owners.catch_up()
    assert_replay_state(s, client, batch)


def test_partitions_given_up_are_taken_over_at_once_and_others_once_the_claim_window_passed(
        owned_settings, client):
    """A claim given up is taken at once; one not given up once the claim window has passed
    since its holder last checked it (here: claimed it), on Redis's clock: a holder that
    crashed longer ago than that costs nothing; a process's own claim, nothing."""
    s = owned_settings.model_copy(update={"cluster_claim_window_s": 1.5})
    first, keys = worker(s, client), RedisKeys(s.key_prefix)
    sources = [("interactions", p) for p in range(PARTITIONS)]
    first_checked = time.monotonic()
    first.claim_sources(sources)
    release_partitions(client, [keys.source_writer(*sources[0])], first.writer_id)
    second = worker(s, client)
    started = time.monotonic()
    second.claim_sources(sources[:1])  # given up (a rebalance, everything written): no wait
    assert time.monotonic() - started < 1.0
    release_partitions(client, [keys.source_writer(*sources[1])], second.writer_id)  # not its
    started = time.monotonic()
    second.claim_sources(sources[1:2])  # held by the first, not given up
    assert time.monotonic() - first_checked >= 1.5 and time.monotonic() - started > 0.5
    time.sleep(1.6)  # the first checks nothing more (crashed): its window passes
    started = time.monotonic()
    second.claim_sources(sources[2:])
    assert time.monotonic() - started < 1.0
    assert all(client.get(keys.source_writer(*source)) == second.writer_id
               for source in sources)
    started = time.monotonic()
    second.claim_sources(sources)  # its own claims (a retry after a lost reply, say): no wait
    assert time.monotonic() - started < 1.0


def test_a_redo_record_replayed_after_an_idle_spell_holds_its_successor_off_as_a_commit_does(
        owned_settings, client, monkeypatch):
    """Applying a redo record again checks the claim as a commit does, and marks when: a
    successor claiming just after waits the window from that check, though the replaying
    worker's last commit is older than the window; the replay, frozen past it, sends nothing."""
    s = owned_settings.model_copy(update={"cluster_claim_window_s": 1.0})
    batch = messages(2400)
    idle = worker(s, client)
    for start in range(0, 30, 3):
        idle.apply_messages(batch[start:start + 3])
    source = ("interactions", 0)
    assert msgspec.msgpack.decode(client.hget(RedisKeys(s.key_prefix).source_redo(*source),
                                              "commands"))  # writes to other nodes to replay
    time.sleep(1.1)  # idle past the window
    checked = time.monotonic()  # the replay checks its claim after this
    replay = FrozenCommit(monkeypatch, lambda: idle._apply_source_redo(source))
    started = time.monotonic()
    next_worker(s, client)
    assert time.monotonic() - checked >= 1.0 and time.monotonic() - started > 0.2
    assert isinstance(replay.wake(), ClaimWindowPassed)
