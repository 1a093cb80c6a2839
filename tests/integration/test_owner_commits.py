"""Item partitions' owners committing to real Redis (state/owner_commits.py), on one server
and on a 3-primary Redis Cluster: what serving reads equals the owners' state of an
in-process replay, after owners crashed between apply and commit, after a second owner of a
partition was fenced off, and (cluster) after a commit stopped half applied."""

import time
import uuid

import pytest
import redis

import state.redis_store
from infra.redis_client import is_cluster, sync_redis
from online_models.registry import build
from online_models.signals import SignalMapper
from state.owner_commits import OwnerFenced, OwnerPartition, owner_stores, read_outboxes
from state.ownership import OwnedLayout
from schemas.keys import RedisKeys
from state.redis_store import PartitionClaimed, build_on_redis, claim_partitions
from state.write_back import UntimedKeySweeper
from stream.simulator import UserSimulator
from tests.state_check import assert_store_holds, redis_snapshot

pytestmark = pytest.mark.integration

PARTITIONS = 3
NAMES = ["session", "mf"]


@pytest.fixture(params=["server", "cluster"])
def owner_settings(request, settings):
    url = (request.getfixturevalue("redis_cluster").url if request.param == "cluster"
           else settings.redis_url)
    return settings.model_copy(update={"redis_url": url, "state_writer": "owned",
                                       "live_models": ",".join(NAMES)})


@pytest.fixture
def client(owner_settings):
    connection = sync_redis(owner_settings.redis_url)
    yield connection
    connection.close()


def replayed_records(chunks: int = 10, size: int = 300) -> tuple[OwnedLayout, list[dict]]:
    """An in-process replay of the owned layout and its records, chunk by chunk."""
    layout = OwnedLayout({name: build(name) for name in NAMES}, PARTITIONS)
    events = list(UserSimulator(120, 250, seed=7).events(chunks * size, 1_700_000_000.0))
    mapper = SignalMapper()
    return layout, [layout.learn(mapper.map(events[n:n + size]))
                    for n in range(0, len(events), size)]


def owner(s, client, partition: int, clock=time.time) -> OwnerPartition:
    """A new owner of ``partition``, as a worker the group assigned it builds it: having
    claimed the partition (on a Redis Cluster every commit checks the claim)."""
    writer_id = uuid.uuid4().hex.encode()
    if is_cluster(client):
        claim_partitions(client, [RedisKeys(s.key_prefix).owner_writer(partition)], writer_id)
    return OwnerPartition(client, s.key_prefix, partition, owner_stores(s, client, clock),
                          writer_id, claim_window_s=s.cluster_claim_window_s)


def apply_every_record(s, client, chunks: list[dict], partitions) -> None:
    """A new owner of each of ``partitions`` applies every chunk's record and commits."""
    for partition in partitions:
        other = owner(s, client, partition)
        for chunk in chunks:
            other.apply(chunk[partition])
        other.commit()


def assert_serving_reads_the_replay(s, client, layout: OwnedLayout) -> None:
    readers = build_on_redis(NAMES, client, s.key_prefix, layout="owned")
    for partition in range(PARTITIONS):
        for name in NAMES:
            replayed = build(name).bind(layout.owner_stores[partition][name])
            assert_store_holds(readers[name].store, replayed)


def test_owners_crash_between_apply_and_commit_and_end_equal_to_the_replay(owner_settings,
                                                                           client):
    s = owner_settings
    assert s.live_model_names == NAMES
    layout, chunks = replayed_records()
    dropped = 0
    for partition in range(PARTITIONS):
        records = [chunk[partition] for chunk in chunks if partition in chunk]
        live = owner(s, client, partition)
        for number, record in enumerate(records[:6]):
            assert live.apply(record) is not None
            if number % 2:  # commits every second record
                assert live.commit() > 0
        live.apply(records[6])  # applied in memory, then the process dies: not committed
        live = owner(s, client, partition)  # a new owner: Redis's state and offsets
        assert live.applied == {"replay:0": 6}
        for record in records[4:]:  # the topic redelivers from before the last commit
            dropped += live.apply(record) is None
        live.commit()
        assert live.commit() == 0  # nothing new: nothing written
    assert dropped == 2 * PARTITIONS  # records 4 and 5, committed before the crash
    assert_serving_reads_the_replay(s, client, layout)


def test_a_second_owner_of_a_partition_is_fenced_off_and_starts_again(settings,
                                                                       redis_client):
    """On one server, two owners of a partition that both think they own it (the claims
    of a cluster aside): whichever commits second since it read is fenced off."""
    s = settings.model_copy(update={"state_writer": "owned", "live_models": ",".join(NAMES)})
    client = redis_client
    layout, chunks = replayed_records(chunks=6)
    records = [chunk[0] for chunk in chunks]
    first, second = owner(s, client, 0), owner(s, client, 0)  # a partition moved
    for record in records[:3]:
        first.apply(record)
        second.apply(record)
    first.commit()
    with pytest.raises(OwnerFenced, match="item partition 0"):
        second.commit()
    assert second.applied == first.applied  # started again from what the first committed
    for record in records:
        second.apply(record)
    second.commit()
    assert first.apply(records[3]) is not None  # the first still thinks it owns it
    with pytest.raises(OwnerFenced):
        first.commit()
    apply_every_record(s, client, chunks, partitions=(1, 2))
    assert_serving_reads_the_replay(s, client, layout)


def test_on_a_cluster_an_owner_evicted_without_knowing_writes_nothing_once_claimed(
        settings, redis_cluster):
    """A worker frozen past the session timeout: the group gave its item partition to
    another, which claimed it. The frozen owner's commit fails whole (it would overwrite its
    successor's rows) and says why (the worker exits); the successor goes on."""
    s = settings.model_copy(update={"redis_url": redis_cluster.url, "state_writer": "owned",
                                    "live_models": ",".join(NAMES)})
    client = sync_redis(s.redis_url)
    layout, chunks = replayed_records(chunks=6)
    records = [chunk[0] for chunk in chunks]
    frozen = owner(s, client, 0)
    for record in records[:2]:
        frozen.apply(record)
    frozen.commit()
    frozen.apply(records[2])  # applied in memory; then frozen past its session
    successor = owner(s, client, 0)  # claimed at the assignment; nothing committed yet
    written = redis_snapshot(client, s.key_prefix)
    with pytest.raises(PartitionClaimed, match="item partition 0"):
        frozen.commit()
    assert redis_snapshot(client, s.key_prefix) == written
    for record in records:
        successor.apply(record)
    successor.commit()
    apply_every_record(s, client, chunks, partitions=(1, 2))
    assert_serving_reads_the_replay(s, client, layout)
    client.close()


def test_owners_expire_their_keys_and_a_successor_gives_what_it_left_a_ttl(owner_settings,
                                                                           client):
    """Owners write rows and vectors without TTLs (MSET, as the single writer) and delete
    them once idle past their table's TTL, in a commit; the next owner of the partition
    cannot know them, and its sweep gives every key without a TTL its table's TTL."""
    s = owner_settings
    _, chunks = replayed_records(chunks=4)
    records = [chunk[0] for chunk in chunks]
    clock = [time.time()]
    first = owner(s, client, 0, clock=lambda: clock[0])
    first.apply(records[0])
    first.commit()
    bases = [reader.store.base for reader in build_on_redis(
        NAMES, client, s.key_prefix, layout="owned").values()]

    def untimed() -> set[bytes]:
        return {name for base in bases
                for name in client.scan_iter(match=f"{base}:*", _type="string")
                if client.pttl(name) == -1}

    written = untimed()
    assert len(written) > 10  # item rows and vectors, no TTL
    assert all(client.hgetall(f"{base}:expiry") for base in bases)  # each table's TTL noted
    clock[0] += max(s.item_state_ttl_s, s.user_state_ttl_s) + 1  # all of it idle since
    first.apply(records[1])
    first.commit()
    assert not any(client.exists(name) for name in written - untimed())  # deleted, not timed
    assert written - untimed()  # the keys the second record did not write again
    left = untimed()
    successor = owner(s, client, 0)  # the partition moved; the first owner's keys stay
    assert UntimedKeySweeper().request(list(successor.stores.values())).result(30) >= len(left)
    ttls = [client.pttl(name) for name in left]
    assert all(0 < ttl <= 1000 * s.item_state_ttl_s for ttl in ttls), ttls


def test_records_are_checked_against_their_outbox_where_the_commit_cannot(owner_settings,
                                                                          client):
    """A record whose outbox entry Redis does not hold (its chunk's commit lost): on one
    server an unchecked apply takes it and the commit fences it off (it checks the entries
    under its WATCH); on a Redis Cluster, where the commit cannot, the apply drops it."""
    s = owner_settings
    keys = RedisKeys(s.key_prefix)
    _, chunks = replayed_records(chunks=2)
    client.set(keys.owned_epoch, b"e")
    live = owner(s, client, 0)
    applied = live.apply_sent([b"e"], [chunks[0][0]], [0], checked=False)
    if live.cluster:
        assert applied == [None] and live.applied == {}
        client.hset(keys.outbox("replay", 0), "1:0", chunks[0][0])  # its chunk committed
        assert live.apply_sent([b"e"], [chunks[0][0]], [0], checked=False) != [None]
        live.commit()
    else:
        assert applied != [None]
        with pytest.raises(OwnerFenced, match="went back"):
            live.commit()
    assert live.applied == ({"replay:0": 1} if live.cluster else {})


def test_a_cluster_commit_stopped_half_applied_is_completed_by_the_next_owner(
        settings, redis_cluster, monkeypatch):
    s = settings.model_copy(update={"redis_url": redis_cluster.url, "state_writer": "owned",
                                    "live_models": ",".join(NAMES)})
    client = sync_redis(s.redis_url)
    layout, chunks = replayed_records(chunks=6)
    send = state.redis_store.apply_commands
    calls = []

    def half_then_fail(client_, commands, scripts, before_send=None, wait=None):
        calls.append(len(commands))
        if len(calls) == 2:  # the second commit: half its writes, then the link drops
            send(client_, commands[:len(commands) // 2], scripts, before_send, wait)
            raise redis.ConnectionError("connection lost mid-commit")
        send(client_, commands, scripts, before_send, wait)

    for partition in range(PARTITIONS):
        live = owner(s, client, partition)
        assert live.cluster
        records = [chunk[partition] for chunk in chunks]
        calls.clear()
        monkeypatch.setattr(state.redis_store, "apply_commands", half_then_fail)
        with pytest.raises(redis.ConnectionError):
            for record in records[:3]:
                live.apply(record)
                live.commit()
        monkeypatch.setattr(state.redis_store, "apply_commands", send)
        assert len(calls) == 2 and calls[-1] > 2  # stopped half way through its rows
        live = owner(s, client, partition)  # applies the redo record, then goes on
        assert live.applied == {"replay:0": 2}
        dropped = [live.apply(record) is None for record in records]
        assert dropped == [True, True, False, False, False, False]
        live.commit()
    assert_serving_reads_the_replay(s, client, layout)
    client.close()


def test_records_of_a_history_redis_lost_are_applied_neither_before_nor_in_a_commit(settings):
    """Redis goes back to an older state (a restart from an older snapshot, a failover to a
    replica that lagged) while records of chunks committed after it are applied or in flight,
    before the worker notices: their outbox entries are not there, so the owners drop them
    (and a commit holding one writes nothing); once the worker has learnt those events again
    under a new epoch, serving reads the replay's state: every event once."""
    s = settings.model_copy(update={"state_writer": "owned", "live_models": ",".join(NAMES)})
    client, keys = sync_redis(s.redis_url), RedisKeys(s.key_prefix)
    layout, chunks = replayed_records(chunks=6)
    outbox = keys.outbox("replay", 0)

    def stage_one_commits(number: int) -> None:  # the worker's commit of chunk ``number``
        client.hset(outbox, mapping={f"{number + 1}:{p}": record
                                     for p, record in chunks[number].items()})

    def relay(owners, number: int, epoch: bytes) -> list[int | None]:
        return [owners[p].apply_sent([epoch], [chunks[number][p]], [number])[0]
                for p in range(PARTITIONS)]

    client.set(keys.owned_epoch, b"first")
    owners = [owner(s, client, p) for p in range(PARTITIONS)]
    for number in (0, 1):
        stage_one_commits(number)
        assert None not in relay(owners, number, b"first")
        for live in owners:
            live.commit()
    # this test's keys (other tests' keys on the server may expire meanwhile)
    snapshot = {name: client.dump(name) for name in client.scan_iter(f"{s.key_prefix}:*")}
    stage_one_commits(2)
    assert None not in relay(owners, 2, b"first")  # applied in memory; then Redis goes back
    client.flushall()
    for name, value in snapshot.items():
        client.restore(name, 0, value)
    for live in owners:  # its progress and the epoch are as it left them: only entries differ
        with pytest.raises(OwnerFenced, match="went back"):
            live.commit()
        assert live.applied == {"replay:0": 2}
    for number in (2, 3):  # in flight before the loss: the outbox has no entry of theirs
        assert relay(owners, number, b"first") == [None] * PARTITIONS
    for live in owners:
        live.commit()
    client.set(keys.owned_epoch, b"second")  # the worker noticed, learns chunks 2.. again
    for number in range(2, len(chunks)):
        stage_one_commits(number)
        assert None not in relay(owners, number, b"second")
    for live in owners:
        live.commit()
    assert client.hlen(outbox) == 0  # every entry applied once and deleted
    assert_serving_reads_the_replay(s, client, layout)
    client.close()


def test_the_relay_reads_every_entry_or_only_those_it_has_to_send(owner_settings, client):
    """``read_outboxes``: every entry of each outbox, oldest first; with what was sent up to
    and the owners handed off locally, only the entries past it for other owners (the rest
    are not read)."""
    keys = RedisKeys(owner_settings.key_prefix)
    client.set(keys.owned_epoch, b"e1")
    client.hset(keys.outbox("interactions", 0),
                mapping={"5:0": b"a", "5:1": b"b", "7:0": b"c", "7:2": b"d", "12:1": b"e"})
    client.hset(keys.outbox("interactions", 1), mapping={"3:2": b"f"})
    sources = [("interactions", 0), ("interactions", 1), ("interactions", 2)]
    epoch, every = read_outboxes(client, keys, sources)
    assert epoch == b"e1"
    assert every == {("interactions", 0): [(5, 0, b"a"), (5, 1, b"b"), (7, 0, b"c"),
                                           (7, 2, b"d"), (12, 1, b"e")],
                     ("interactions", 1): [(3, 2, b"f")], ("interactions", 2): []}
    epoch, unsent = read_outboxes(client, keys, sources, {("interactions", 0): 5}, {0})
    assert epoch == b"e1"
    assert unsent == {("interactions", 0): [(7, 2, b"d"), (12, 1, b"e")],
                      ("interactions", 1): [(3, 2, b"f")], ("interactions", 2): []}
    assert read_outboxes(client, keys, sources, {("interactions", 0): 12,
                                                 ("interactions", 1): 3})[1] == {
        source: [] for source in sources}
