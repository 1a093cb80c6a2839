"""The owned layout's hop in the worker (STREAMREC_STATE_WRITER=owned, docs/item-ownership.md).

- **The relay**: a chunk's item-delta records are written to its source partition's outbox
  in the chunk's commit (:meth:`stream.state.LiveState.compute`), one entry per owner
  partition. Once a commit is known to have succeeded, the relay reads that outbox from
  Redis and sends the entries it has not sent yet, in offset order, to the item-deltas topic
  (one topic partition per owner partition), keyed by the epoch (``RedisKeys.owned_epoch``).
  It reads Redis rather than trusting what it just committed: entries another worker left
  behind (a crash, a source partition that moved) go before this worker's later ones, so
  each owner receives a source partition's records in offset order. After every rebalance,
  and whenever the epoch changed, it sends again every entry still there (an entry sent twice
  is dropped by its owner); each second it looks at every assigned partition's outbox, so
  entries of a partition with no new commit go out too. Entries for an owner partition this
  worker holds skip the topic (``STREAMREC_OWNED_LOCAL_HANDOFF``): the relay hands every
  such entry still in the outbox to that owner, which drops those it applied before; at most
  once per ``STREAMREC_OWNED_HANDOFF_INTERVAL_S`` (passes in between read and send only the
  entries for other workers' owners that they have not sent yet).
- **The owners' agent**: the group assigns the item-deltas partitions as it assigns the
  interactions'. For each partition it holds, an :class:`state.owner_commits.OwnerPartition`
  applies the batch's records of the current epoch; before the batch is acked they commit,
  in one transaction, the changed rows, their progress (source offsets applied, the
  item-deltas offset: where the next owner resumes after a rebalance) and the deletion of
  the outbox entries applied. Fenced owners (another took a partition, the epoch changed,
  Redis went back) start again from Redis and apply the batch again, each record checked.
  On a Redis Cluster the worker claims the item partitions it is assigned, and an owner whose
  partition another worker claimed (this one was evicted without knowing) exits the process.
  At a rebalance the owner commit in progress finishes before the partitions are given up
  (:func:`owners_written`).

Entries leave an outbox only once applied, so a new epoch loses nothing: records sent under
an older one (before Redis lost writes, or before a worker started) are dropped by owners and
sent again from the outboxes, under the new one.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from infra.redis_client import replica_wait, sync_redis
from schemas.events import InvalidEvent
from state.ownership import record_problem
from state.owner_commits import (OwnerFenced, OwnerPartition, commit_owners, owner_stores,
                                 read_outboxes, read_positions)
from state.redis_store import PartitionClaimed, claim_partitions
from schemas.keys import RedisKeys
from stream import metrics
from stream.app import app, settings
from stream.ingest import (EXIT_ON_BUG, AssignedSince, apply_pipeline, assigned_partitions,
                           committed_listeners, consume_batches, dead_letter,
                           deliver_dead_letters, exit_process, exit_when_moved, message_bytes,
                           revocation_writes, seek_to_positions, send_to_partitions)
from stream.pipeline import run_retrying

log = logging.getLogger("streamrec.owners")

item_deltas_topic = app.topic(settings.topic_item_deltas, key_type=bytes, value_type=bytes,
                              key_serializer="raw", value_serializer="raw")
_keys = RedisKeys(settings.key_prefix)
_client = None
_owners: dict[int, OwnerPartition] = {}
_owners_assigned = AssignedSince()  # item partitions held here, since when
_to_relay: set[tuple[str, int]] = set()  # source partitions whose outbox may hold entries
#: per source partition, the last outbox offset this worker sent since the last rebalance
_sent_up_to: dict[tuple[str, int], int] = {}
_sent_epoch: bytes | None = None  # the epoch those were sent under
_relay_due = asyncio.Event()
_handoff_timer: asyncio.TimerHandle | None = None  # the relay pass of the next hand-off
#: item partition → its records' epochs, the records and their item-deltas offsets
Batch = dict[int, tuple[list[bytes | None], list[bytes], list[int]]]
#: threads of their own: the owners' and the relay's Redis work never waits behind a chunk's
_owner_thread = ThreadPoolExecutor(1, thread_name_prefix="item-owners")
#: held by every owner commit (a batch's, a local hand-off's, an idle owner's build): at a
#: rebalance the worker waits for it before giving its partitions up (:func:`owners_written`)
_owner_writes = asyncio.Lock()
_relay_thread = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay")


def owners_redis():
    """The owners' and the relay's Redis client (built before the worker joins its group:
    :func:`infra.cli.build_worker_state`)."""
    global _client
    if _client is None:
        _client = sync_redis(settings.redis_url)
    return _client


def _note_outboxes(result) -> None:
    if result.outboxes:
        _to_relay.update(result.outboxes)
        _relay_due.set()


@app.task
async def relay_outboxes() -> None:
    """Send the outboxes' entries to the item-deltas topic (module doc), for ever: the
    waiting source partitions' entries at once, each partition's in offset order. Entries
    for an owner partition this worker holds are applied here instead (the local hand-off),
    concurrently with the sends."""
    global _sent_epoch
    topic = item_deltas_topic.get_topic_name()
    loop, handed_at = asyncio.get_running_loop(), float("-inf")
    while True:
        await _relay_due.wait()
        if app.rebalancing:  # owner partitions may be moving: no hand-off till it completes
            await asyncio.sleep(0.1)
            continue
        _relay_due.clear()
        waiting = sorted(_to_relay)
        _to_relay.clear()
        held = _held_owner_partitions() if settings.owned_local_handoff else set()
        handoff_in = handed_at + settings.owned_handoff_interval_s - loop.time()
        handing = bool(held) and handoff_in <= 0
        # a pass that hands nothing off reads only the entries it has to send
        epoch, outboxes = await run_retrying(
            _relay_thread, "outbox read", read_outboxes, owners_redis(), _keys, waiting,
            *(() if handing else (dict(_sent_up_to), held)))
        if epoch != _sent_epoch:  # what was sent before is dropped: send it all again
            _sent_up_to.clear()
            _sent_epoch = epoch
            if not handing:  # this read skipped what was sent under the old epoch
                _to_relay.update(waiting)
                _relay_due.set()
                continue
        if held and not handing:
            _hand_off_later(waiting, handoff_in)
        by_owner: dict[int, list[tuple[bytes | None, bytes]]] = {}
        local: Batch = {}
        sent: dict[tuple[str, int], int] = {}
        for source, entries in outboxes.items():
            for offset, owner, record in entries:
                if owner in held:  # every entry still there: its owner drops those applied
                    epochs, records, _ = local.setdefault(owner, ([], [], []))
                    epochs.append(epoch)
                    records.append(record)
                elif offset > _sent_up_to.get(source, -1):
                    by_owner.setdefault(owner, []).append((epoch, record))
                    sent[source] = offset
        if not by_owner and not local:
            continue
        if local:
            handed_at = loop.time()
        handed, relayed = await asyncio.gather(_apply_locally(local), _send(topic, by_owner))
        if relayed:
            _sent_up_to.update(sent)
        if not (handed and relayed):  # the entries stay in their outboxes: again soon
            _to_relay.update(waiting)
            await asyncio.sleep(0.5)
            _relay_due.set()


def _hand_off_later(sources: list[tuple[str, int]], delay_s: float) -> None:
    """A relay pass for ``sources`` once the next hand-off is due (one timer at a time;
    an earlier pass takes them along)."""
    global _handoff_timer
    _to_relay.update(sources)
    if _handoff_timer is None:
        def due() -> None:
            global _handoff_timer
            _handoff_timer = None
            _relay_due.set()
        _handoff_timer = asyncio.get_running_loop().call_later(max(delay_s, 0.0), due)


def _held_owner_partitions() -> set[int]:
    """The item-deltas partitions (owner partitions) assigned to this worker now."""
    return {tp.partition for tp in app.consumer.assignment()
            if tp.topic == settings.topic_item_deltas}


async def _send(topic: str, by_owner: dict[int, list[tuple[bytes | None, bytes]]]) -> bool:
    """Produce the records to their owner partitions; False where the broker failed."""
    if not by_owner:
        return True
    try:
        await asyncio.gather(*await send_to_partitions(topic, by_owner))
    except Exception as exc:  # noqa: BLE001 - the broker: the entries stay; again soon
        log.warning("relaying item deltas failed (%r); retrying", exc)
        return False
    metrics.ITEM_DELTAS_RELAYED.inc(sum(len(rows) for rows in by_owner.values()))
    return True


async def _apply_locally(batch: Batch) -> bool:
    """Apply and commit records for this worker's own owner partitions (read from the
    outboxes, so present under the epoch read with them); False where an owner was fenced
    off (the partition moved, the epoch changed): the entries stay in their outboxes."""
    if not batch:
        return True
    try:
        async with _owner_writes:
            operations = await run_retrying(_owner_thread, "item deltas (local)",
                                            apply_records, dict(sorted(batch.items())))
    except OwnerFenced as exc:
        log.warning("%s; the records stay in their outboxes", exc)
        return False
    except PartitionClaimed as exc:
        exit_when_moved(exc)
    except Exception:
        log.critical("item deltas (local) bug; exiting so the outboxes are sent again",
                     exc_info=True)
        exit_process(EXIT_ON_BUG)
    metrics.ITEM_DELTA_OPERATIONS.inc(operations)
    metrics.ITEM_DELTAS_HANDED.inc(sum(len(records) for _, records, _ in batch.values()))
    metrics.ITEM_DELTA_HANDOFFS.inc()
    return True


@app.timer(1.0)
async def relay_idle_outboxes() -> None:
    """Look at every assigned source partition's outbox each second: entries of a partition
    with no new commit (left by another worker, or to send again under a new epoch) go out
    too."""
    _to_relay.update((tp.topic, tp.partition) for tp in assigned_partitions())
    _relay_due.set()


@app.on_rebalance_complete.connect
async def relay_assigned_outboxes(sender, **_) -> None:
    """Drain the outboxes of the source partitions assigned (entries another worker left);
    forget the owners of item partitions no longer held (taken again from Redis if they
    come back); seek the item partitions held to where their owners' committed progress
    ends."""
    _sent_up_to.clear()  # send what owners have not applied again, under today's epoch
    _to_relay.update((tp.topic, tp.partition) for tp in assigned_partitions())
    _relay_due.set()
    # user-side keys go without TTLs until idle (WriteBackStore.others_may_write): those of
    # a worker that left (kill -9) and nobody writes again get their TTLs here
    state = apply_pipeline().state
    state.expiry_sweeper.request(state.user_side_stores)
    held = sorted(tp for tp in app.consumer.assignment()
                  if tp.topic == settings.topic_item_deltas)
    numbers = {tp.partition for tp in held}
    _owners_assigned.update(numbers)
    for partition in [p for p in _owners if p not in numbers]:
        del _owners[partition]
    if held:  # resume where each owner's committed state ends (after a Redis loss too)
        if state.cluster:  # from now on an evicted predecessor's commits fail
            await run_retrying(_owner_thread, "claiming item partitions", claim_partitions,
                               owners_redis(), [_keys.owner_writer(p) for p in sorted(numbers)],
                               state.writer_id, settings.cluster_claim_window_s)
        positions = await run_retrying(_owner_thread, "owner positions", read_positions,
                                       owners_redis(), _keys, sorted(numbers))
        await seek_to_positions(positions, held)


@app.timer(1.0)
async def build_idle_owners() -> None:
    """Build the owner of each item partition held here ``PREDECESSOR_DRAIN_S`` or more
    that no record has come for (:func:`take_owners`): on a Redis Cluster a commit a crash
    cut half-way is completed then, not only once a record comes (one may never come). Not
    sooner: the partition's previous owner may still be committing, and its newer rows must
    not be overwritten by the older record."""
    idle = [partition for partition in _owners_assigned.settled(_held_owner_partitions())
            if partition not in _owners]
    if idle:
        try:
            async with _owner_writes:
                await run_retrying(_owner_thread, "building idle owners", take_owners, idle)
        except PartitionClaimed as exc:  # evicted without knowing: another worker holds it
            exit_when_moved(exc)
        except Exception as exc:  # noqa: BLE001 - the next tick tries again (a record may)
            log.warning("building idle owners failed (%r)", exc)


def take_owners(partitions: list[int]) -> list[OwnerPartition]:
    """The owners of item ``partitions``; those this worker did not hold are built from
    Redis (a commit a crash cut half-way completed from its redo record), and their
    predecessors' keys get TTLs."""
    started = []
    for partition in partitions:
        if partition not in _owners:
            _owners[partition] = OwnerPartition(owners_redis(), settings.key_prefix, partition,
                                                owner_stores(settings, owners_redis()),
                                                apply_pipeline().state.writer_id,
                                                claim_window_s=settings.cluster_claim_window_s,
                                                replica_wait=replica_wait(settings))
            started.append(_owners[partition])
    if started:  # (once restored: redo applied)
        apply_pipeline().state.expiry_sweeper.request(list(started[0].stores.values()))
    return [_owners[partition] for partition in partitions]


def apply_records(batch: Batch) -> int:
    """Apply a batch's records (item partition → their epochs, records and item-deltas
    offsets) to the partitions' owners and commit them together; returns the operations
    applied. Fenced: again from what Redis holds, each record checked against Redis before
    it is applied. Any other error drops the owners (the next try builds them from Redis)
    and propagates."""
    checked = False
    for _ in range(3):
        owners = take_owners(list(batch))
        try:
            operations = sum(n or 0 for owner in owners
                             for n in owner.apply_sent(*batch[owner.partition],
                                                       checked=checked))
            commit_owners(owners)
            return operations
        except OwnerFenced as exc:
            log.warning("%s", exc)
            checked = True
        except BaseException:
            for partition in batch:
                _owners.pop(partition, None)
            raise
    raise OwnerFenced(f"item partitions {sorted(batch)}: fenced off three times in a row")


def _owned_batch(messages, dead_letters: list | None = None) -> Batch:
    """A batch of item-deltas messages by item partition; with ``dead_letters``, those that
    are not item-delta records (:func:`state.ownership.record_problem`) are left out (their
    offsets kept: the owner's position moves past them) and their dead letters added."""
    batch: Batch = {}
    for event in messages:
        epochs, records, positions = batch.setdefault(event.message.partition, ([], [], []))
        positions.append(event.message.offset)
        raw = message_bytes(event)
        if dead_letters is not None and (problem := record_problem(raw)) is not None:
            dead_letters.append(dead_letter(
                raw, [(None, None, InvalidEvent([{"field": "record", "reason": problem}]))],
                event.message, 0))
            continue
        epochs.append(event.key)
        records.append(raw)
    return dict(sorted(batch.items()))


async def _apply_owned(batch: Batch) -> int:
    async with _owner_writes:
        return await run_retrying(_owner_thread, "item deltas", apply_records, batch)


async def apply_owned_batch(messages) -> None:
    """Apply a batch of the item-deltas topic. Where it fails, the records that are not
    item-delta records at all (only workers produce to the topic, but anything with access
    can) go to the dead-letter topic and the rest is applied again: none can stop the
    owners. Any other failure propagates (the worker exits)."""
    try:
        operations = await _apply_owned(_owned_batch(messages))
    except (asyncio.CancelledError, PartitionClaimed):
        raise
    except Exception:
        letters: list = []
        batch = _owned_batch(messages, letters)
        if not letters:
            raise
        log.warning("%d item-deltas messages are not item-delta records: dead-lettered",
                    len(letters))
        await deliver_dead_letters(letters, count_in_redis=True)
        operations = await _apply_owned(batch)
    metrics.ITEM_DELTA_OPERATIONS.inc(operations)


async def owners_written(timeout_s: float) -> bool:
    """Wait (up to ``timeout_s``) for the owner commit in progress, if any; False where it
    did not finish in time. Nothing starts a new one during a rebalance: the agents' flow is
    suspended, the relay hands nothing off and idle owners are not built."""
    try:
        await asyncio.wait_for(_owner_writes.acquire(), timeout_s)
    except asyncio.TimeoutError:
        return False
    _owner_writes.release()
    return True


@app.agent(item_deltas_topic)
async def apply_item_deltas(stream) -> None:
    await consume_batches(stream, apply_owned_batch, "item deltas")


committed_listeners.append(_note_outboxes)
revocation_writes.append(owners_written)
