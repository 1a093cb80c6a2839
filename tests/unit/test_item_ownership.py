"""Item-side writes as delta records applied by their owner partitions (state/ownership.py):
the owners end with exactly the state of models learning straight into one store."""

import numpy as np
import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.ownership import (ChunkDeltas, DeltaRecorder, Owner, OwnedLayout, OwnedStores,
                             held_state, owner_partition)
from stream.simulator import UserSimulator

PARTITIONS = 4


def _chunks(seed: int, events: int = 6000, chunk: int = 500):
    stream = list(UserSimulator(150, 300, seed=seed).events(events, 1_700_000_000.0))
    mapper = SignalMapper()
    return [mapper.map(stream[n:n + chunk]) for n in range(0, len(stream), chunk)]


def _learn_owned(names, chunks):
    """A replay of the owned layout: (the worker's stores, the owners' stores, operations)."""
    layout = OwnedLayout({name: build(name) for name in names}, PARTITIONS)
    for signals in chunks:
        layout.learn(signals)
    return layout.local, layout.owner_stores, layout.sizes["operations"]


@pytest.mark.parametrize("seed", [1, 2])
def test_owned_state_equals_learning_into_one_store_bit_for_bit(seed):
    names = ["session", "mf", "cooc"]  # cooc: pair rows, a claimed landmark, trims
    chunks = _chunks(seed)
    direct = {name: build(name).bind(MemoryStore()) for name in names}
    for signals in chunks:
        for model in direct.values():
            model.learn(signals)
    local, owners, applied = _learn_owned(names, chunks)
    assert applied > len(chunks)  # records carried operations
    for name in names:
        stores = [local[name], *(o[name] for o in owners)]
        assert held_state(stores) == held_state([direct[name].store]), name  # bit for bit
        for table, rows in direct[name].store.rows.items():
            # one writer per key: no key in two places
            assert sum(len(s.rows.get(table, {})) for s in stores) == len(rows), (name, table)


def test_each_shared_key_lands_with_its_owner_partition_only():
    local, owners, _ = _learn_owned(["session", "mf"], _chunks(3, events=2000))
    spread = set()
    for partition, owner in enumerate(owners):
        for name, store in owner.items():
            for table, rows in store.rows.items():
                for key in rows:
                    assert owner_partition(key, PARTITIONS) == partition, (name, table, key)
                    spread.add(partition)
            for table, vectors in store.vectors.items():
                assert all(owner_partition(key, PARTITIONS) == partition for key in vectors)
    assert spread == set(range(PARTITIONS))  # items spread over every owner
    # user and session state stayed with the worker that learnt it
    assert local["session"].rows["sess"] and local["mf"].vectors["user"]
    assert "isess" not in local["session"].rows and "item" not in local["mf"].vectors


def test_a_record_with_an_unknown_operation_is_refused_and_owned_stores_are_read_only():
    import msgspec

    store = MemoryStore()
    owner = Owner(lambda _ns: store)
    good = ["mf", "incr", "df", -1, [["a"], [0, 1], ["n"], np.ones(1).tobytes()]]
    with pytest.raises(ValueError, match="unknown operation 'drop'"):
        owner.apply(msgspec.msgpack.encode(({"interactions:0": 5},
                                            [good, ["mf", "drop", "item", -1, []]])))
    assert store.rows == {} and owner.applied == {}  # refused whole: nothing applied
    with pytest.raises(ValueError, match="no source offsets"):
        owner.apply(msgspec.msgpack.encode(({}, [good])))
    assert owner.apply(msgspec.msgpack.encode(({"interactions:0": 5}, [good]))) == 1
    assert store.rows == {"df": {"a": {"n": 1.0}}}
    owned = OwnedStores([MemoryStore(), MemoryStore()])
    with pytest.raises(TypeError, match="written by their owners"):
        owned.incr_rows("isess", {"a": {"s": 1.0}})


def test_an_owner_applies_each_record_once_across_re_sends_and_its_own_restart():
    """Records of two source partitions, interleaved; the relay sends some twice (after its
    crash) and the owner restarts from a checkpoint, so the topic redelivers what came after:
    every duplicate is dropped by its source offsets and the state is as if each came once."""
    import copy

    deltas = ChunkDeltas(1)
    store = MemoryStore()
    recorder = DeltaRecorder(MemoryStore(), store, deltas, "m")
    records = []
    for n in range(6):  # chunk n of source partition n % 2, last offsets 10, 20, ...
        recorder.incr_rows("df", {f"item{n % 3}": {"n": 1.0}})
        records.append(deltas.take_records({f"interactions:{n % 2}": 10 * (n // 2 + 1)})[0])
    once = MemoryStore()
    owner = Owner(lambda _ns: once)
    assert [owner.apply(r) for r in records] == [1] * 6
    assert once.rows["df"] == {"item0": {"n": 2.0}, "item1": {"n": 2.0}, "item2": {"n": 2.0}}

    got = MemoryStore()
    owner = Owner(lambda _ns: got)
    topic = [records[0], records[1], records[2], records[1], records[2],  # re-sent by a relay
             records[3], records[4]]
    outcomes = [owner.apply(r) for r in topic[:5]]
    assert outcomes == [1, 1, 1, None, None]
    checkpoint = copy.deepcopy(got), dict(owner.applied)  # committed together
    for record in topic[5:]:
        owner.apply(record)
    # the owner restarts from its checkpoint: the topic redelivers from record 3 on
    got, applied = checkpoint
    owner = Owner(lambda _ns: got, applied)
    outcomes = [owner.apply(r) for r in [records[2], records[3], records[4], records[5]]]
    assert outcomes == [None, 1, 1, 1]
    assert got.rows["df"] == once.rows["df"]
    assert owner.applied == {"interactions:0": 30, "interactions:1": 30}


class _CountedReads(MemoryStore):
    """A shared store that counts its vector reads (each one a round trip to Redis live)."""

    def __init__(self) -> None:
        super().__init__()
        self.vector_reads: list[list[str]] = []

    def get_vectors(self, table, keys, dim):
        self.vector_reads.append(list(keys))
        return super().get_vectors(table, keys, dim)


def test_a_batch_learnt_per_source_partition_reads_each_shared_vector_once():
    """A worker learns each source partition's events of a batch apart; within the batch's
    shared_reads scope they share what the batch prefetched: one read of the item vectors,
    and learning ends as it does with a read per group."""
    [signals] = _chunks(4, events=600, chunk=600)
    halves = [signals.select(np.arange(len(signals)) % 2 == side) for side in (0, 1)]
    ends = []
    for scoped in (False, True):
        shared = _CountedReads()
        shared.set_vectors("item", ["i0"], np.ones((1, 32), np.float32))  # one stored
        deltas = ChunkDeltas(PARTITIONS)
        model = build("mf").bind(DeltaRecorder(MemoryStore(), shared, deltas, "mf"))
        model.prefetch(signals)
        if scoped:
            with model.store.shared_reads():
                for half in halves:
                    model.learn(half)
        else:
            for half in halves:
                model.learn(half)
        ends.append((deltas.take_records({"events:0": 1}), shared.vector_reads))
    (unscoped_records, unscoped_reads), (scoped_records, scoped_reads) = ends
    assert len(unscoped_reads) == 2  # a read per group without the scope
    assert len(scoped_reads) == 1  # the batch's prefetch, read once for both groups
    assert set(scoped_reads[0]) == set(signals.items.tolist())
    assert scoped_records == unscoped_records  # the same deltas, bit for bit
