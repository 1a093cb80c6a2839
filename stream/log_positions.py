"""Redis progress against the Kafka log: find partitions where the two disagree, and let an
operator choose where such a partition resumes.

Redis's per-partition watermark (the highest offset whose effects are applied) is the truth
for progress. It must lie inside the log: ``log_start - 1 <= watermark < log_end``. Outside it,
resuming would lose events silently:

* ``watermark >= log_end``: the log went **backwards** — the broker lost data (memory storage
  restarted, unclean leader election) or the topic was deleted and recreated. Its new events
  sit at offsets the watermark says are applied, so they would be skipped as redeliveries.
* ``watermark + 1 < log_start``: retention deleted offsets that were never applied.
* the topic's id (KIP-516) is not the one recorded beside the watermark: the topic was
  deleted and recreated (or the broker lost its data) — caught even where the new log has
  already grown past the watermark, which the offsets alone cannot tell.

Either way the worker holds the partition back (applies nothing of it, keeps the others
going), counts ``streamrec_held_partitions``, records the reason in Redis
(:attr:`schemas.keys.RedisKeys.held_partitions`) and logs it at CRITICAL, until an operator
picks a resume point with ``streamrec offsets --reset start|end|OFFSET``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from schemas.keys import RedisKeys


@dataclass(frozen=True)
class LogMismatch:
    topic: str
    partition: int
    watermark: int
    log_start: int
    log_end: int
    applied_topic_id: str | None = None  # set where the topic's id changed under the mark
    topic_id: str | None = None

    @property
    def topic_changed(self) -> bool:
        return self.applied_topic_id is not None

    @property
    def reason(self) -> str:
        where = f"{self.topic}[{self.partition}]"
        if self.topic_changed:
            return (f"{where}: Redis has applied up to offset {self.watermark} of topic id "
                    f"{self.applied_topic_id}, but the topic's id is now {self.topic_id}: the "
                    f"topic was recreated or the broker lost its data, so the log went "
                    f"backwards under Redis's progress. Held; choose where to resume with "
                    f"`streamrec offsets --reset start|end|OFFSET --partition {self.partition}`")
        if self.watermark >= self.log_end:
            return (f"{where}: Redis has applied up to offset {self.watermark} but the log ends "
                    f"at {self.log_end}: the log went backwards (broker data lost, or the "
                    f"topic recreated). Held; choose where to resume with `streamrec offsets "
                    f"--reset start|end|OFFSET --partition {self.partition}`")
        return (f"{where}: offsets {self.watermark + 1}..{self.log_start - 1} were deleted by "
                f"retention before they were applied. Held; resume with `streamrec offsets "
                f"--reset start --partition {self.partition}` to accept the loss")


def find_mismatches(topic: str, watermarks: Mapping[int, int | None],
                    log_starts: Mapping[int, int], log_ends: Mapping[int, int],
                    applied_topic_ids: Mapping[int, str | None] | None = None,
                    topic_id: str | None = None) -> list[LogMismatch]:
    """Partitions whose watermark lies outside ``[log_start - 1, log_end)``, or counts
    offsets of another topic id than ``topic_id`` (``applied_topic_ids``: the ids recorded
    beside the watermarks; a partition or broker without one is judged by offsets alone). A
    partition without a watermark (nothing applied yet) starts at the log's start and always
    fits."""
    found = []
    for partition, mark in sorted(watermarks.items()):
        if mark is None:
            continue
        start, end = log_starts[partition], log_ends[partition]
        applied_id = (applied_topic_ids or {}).get(partition)
        if topic_id is not None and applied_id is not None and applied_id != topic_id:
            found.append(LogMismatch(topic, partition, mark, start, end, applied_id, topic_id))
        elif mark >= end or mark + 1 < start:
            found.append(LogMismatch(topic, partition, mark, start, end))
    return found


def topic_ids_to_record(watermarks: Mapping[int, int | None],
                        applied_topic_ids: Mapping[int, str | None], topic_id: str | None,
                        mismatches: Sequence[LogMismatch]) -> list[int]:
    """Partitions whose recorded topic id should become ``topic_id``: those without one, and
    those with nothing applied yet (their next offset is the current log's start). Never a
    mismatched partition: its old id stays until an operator resets it."""
    if topic_id is None:
        return []
    held = {m.partition for m in mismatches}
    return [p for p, mark in sorted(watermarks.items())
            if p not in held and applied_topic_ids.get(p) != topic_id
            and (applied_topic_ids.get(p) is None or mark is None)]


class LogEndProbe:
    """Confirms a log's end by reading it: the offset after the last record there is.

    A broker's ListOffsets answer can trail the log (Tansu returns the base offset of the last
    record batch), which would make a healthy partition whose last batch is fully applied
    look like a log that went backwards. A mismatch is therefore confirmed by fetching from
    the reported end before a partition is held. Not thread-safe: one caller at a time."""

    def __init__(self, bootstrap: str, client_options: dict | None = None) -> None:
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                       enable_auto_commit=False, **(client_options or {}))

    def log_end(self, topic: str, partition: int, reported_end: int) -> int:
        from kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, reported_end)
        end = reported_end
        for _ in range(3):  # the tail past a trailing answer is one batch
            records = self._consumer.poll(timeout_ms=300).get(tp, [])
            if not records:
                break
            end = max(end, records[-1].offset + 1)
        return end

    def message_at(self, topic: str, partition: int, offset: int,
                   timeout_s: float = 10.0) -> bytes | None:
        """The value of the record at ``offset``, or None when the log does not hold it (its
        start passed it, or its end, read from the log, is not past it)."""
        from kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        self._consumer.assign([tp])
        reported_end = self._consumer.end_offsets([tp])[tp]
        if offset < self._consumer.beginning_offsets([tp])[tp] or (
                offset >= reported_end and offset >= self.log_end(topic, partition, reported_end)):
            return None
        self._consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self._consumer.poll(timeout_ms=1000, max_records=1).get(tp, []):
                return message.value if message.offset == offset else None
        raise TimeoutError(f"{topic}[{partition}]@{offset}: not fetched within {timeout_s:g} s")

    def topic_id(self, topic: str) -> str | None:
        """The topic's id (KIP-516) from fresh metadata; None where the broker gives none
        (metadata before v10) or the topic does not exist."""
        self._consumer.topics()  # a metadata request for every topic, always sent
        topic_id = self._consumer._client.cluster.topic_id(topic)  # kafka-python is pinned
        return str(topic_id) if topic_id is not None else None

    def bounds(self, topic: str) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """(partitions, log start, reported log end) of ``topic``."""
        from kafka import TopicPartition

        partitions = sorted(self._consumer.partitions_for_topic(topic) or [])
        tps = [TopicPartition(topic, p) for p in partitions]
        starts = self._consumer.beginning_offsets(tps) if tps else {}
        ends = self._consumer.end_offsets(tps) if tps else {}
        return (partitions, {tp.partition: o for tp, o in starts.items()},
                {tp.partition: o for tp, o in ends.items()})

    def confirm(self, mismatches: list[LogMismatch]) -> list[LogMismatch]:
        """The mismatches that remain with each log's end read from the log itself."""
        confirmed = []
        for m in mismatches:
            if not m.topic_changed and m.watermark >= m.log_end:
                end = self.log_end(m.topic, m.partition, m.log_end)
                if m.watermark < end:
                    continue
                m = LogMismatch(m.topic, m.partition, m.watermark, m.log_start, end)
            confirmed.append(m)
        return confirmed

    def close(self) -> None:
        self._consumer.close()


def read_watermarks(client, keys: RedisKeys, topic: str, partitions: list[int]
                    ) -> dict[int, int | None]:
    marks = client.mget([keys.watermark(topic, p) for p in partitions]) if partitions else []
    return {p: int(m) if m is not None else None for p, m in zip(partitions, marks)}


def wait_until_applied(client, keys: RedisKeys, topic: str, partition: int, offset: int,
                       timeout_s: float, going_on=lambda: True) -> bool:
    """Whether the workers' watermark of ``topic[partition]`` reaches ``offset`` (the message
    there, such as an erasure request, applied) within ``timeout_s``; polled, and given up
    early once ``going_on()`` is false (the worker exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mark = read_watermarks(client, keys, topic, [partition])[partition]
        if mark is not None and mark >= offset:
            return True
        if time.monotonic() > deadline or not going_on():
            return False
        time.sleep(0.05)


def _partition_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def read_progress(client, keys: RedisKeys, topic: str, partitions: list[int]
                  ) -> tuple[dict[int, int | None], dict[int, str | None]]:
    """Each partition's watermark (:func:`read_watermarks`) and the topic id recorded beside
    it (None: none recorded). Two plain commands, not a pipeline: a Redis Cluster client's
    pipeline takes no MGET, and this runs once per check interval."""
    if not partitions:
        return {}, {}
    ids = client.hmget(keys.topic_ids, [_partition_field(topic, p) for p in partitions])
    return (read_watermarks(client, keys, topic, partitions),
            {p: i.decode() if i is not None else None for p, i in zip(partitions, ids)})


def record_topic_ids(client, keys: RedisKeys, topic: str, partitions: list[int],
                     topic_id: str) -> None:
    if partitions:
        client.hset(keys.topic_ids, mapping={_partition_field(topic, p): topic_id
                                             for p in partitions})


def hold(client, keys: RedisKeys, mismatches: Sequence[LogMismatch] = ()
         ) -> dict[tuple[str, int], str]:
    """Record ``mismatches`` as held (none: only read), in one round trip with reading every
    hold recorded: ``{(topic, partition): reason}`` (holds outlive rebalances and restarts)."""
    pipe = client.pipeline(transaction=False)
    if mismatches:
        pipe.hset(keys.held_partitions,
                  mapping={_partition_field(m.topic, m.partition): m.reason for m in mismatches})
    pipe.hgetall(keys.held_partitions)
    held = {}
    for field, reason in pipe.execute()[-1].items():
        topic, _, partition = field.decode().rpartition(":")
        held[(topic, int(partition))] = reason.decode()
    return held


def reset_target(to: str, log_start: int, log_end: int) -> int:
    """The next offset to apply for ``--reset to``: ``start``, ``end`` or an offset."""
    if to == "start":
        return log_start
    if to == "end":
        return log_end
    if not to.isdigit() or not log_start <= int(to) <= log_end:
        raise ValueError(f"--reset takes start, end or an offset in [{log_start}, {log_end}], "
                         f"not {to!r}")
    return int(to)


def reset_partition(client, keys: RedisKeys, topic: str, partition: int, next_offset: int,
                    topic_id: str | None = None) -> None:
    """Make ``next_offset`` (of the log whose id is ``topic_id``) the next offset the worker
    applies, and release the hold; the worker sees the release within one check interval and
    restarts to resume there."""
    pipe = client.pipeline(transaction=True)
    if topic_id is not None:
        pipe.hset(keys.topic_ids, _partition_field(topic, partition), topic_id)
    if next_offset == 0:
        pipe.delete(keys.watermark(topic, partition))
    else:
        pipe.set(keys.watermark(topic, partition), next_offset - 1)
    pipe.hdel(keys.held_partitions, _partition_field(topic, partition))
    pipe.execute()


def unapplied_records(watermarks: Mapping[int, int | None], log_starts: Mapping[int, int],
                      reported_ends: Mapping[int, int]) -> dict[int, int]:
    """Per partition, the records that certainly exist and Redis has not applied (the
    consumer lag of the applied state). ``reported_ends`` may trail the log (a broker that
    answers with its last batch's base offset), never lead it, so a record at
    ``reported_end - 1`` exists; past the watermark, it is unapplied."""
    return {p: max(reported_ends.get(p, 0) - 1 - (mark if mark is not None
                                                  else log_starts.get(p, 0) - 1), 0)
            for p, mark in sorted(watermarks.items())}


def unapplied_partitions(watermarks: Mapping[int, int | None], log_starts: Mapping[int, int],
                         reported_ends: Mapping[int, int]) -> list[int]:
    """Partitions that certainly hold records Redis has not applied."""
    return [p for p, lag in unapplied_records(watermarks, log_starts, reported_ends).items()
            if lag]


class StallWatch:
    """Decides when a worker must restart because the partitions it should apply stopped
    moving: records wait in the log and their Redis watermarks stayed where they were over
    checks spanning ``timeout_s``.

    Faust's consumer can stop without an error (twice after a broker pause in the soak: the
    worker looked healthy and applied nothing, forever). Only an independent look at the log
    and at Redis can tell, from a thread of its own (a stuck event loop or rebalance cannot
    hide it); a restart resumes from Redis's watermarks, exactly once. "Should apply": the
    partitions assigned to this worker, or every partition when it holds none (a rebalance
    that never completed). A partition another worker keeps applying moves, so it never
    counts. Idle time is measured between checks, so a worker that was itself frozen
    (SIGSTOP, a VM pause) gets a full ``timeout_s`` to move again; ``note_activity`` (a Redis
    retry: Redis is the trouble, not this worker) restarts the count.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._active = False
        self._previous: dict[int, int | None] = {}
        self._stalled_since: float | None = None

    def note_activity(self) -> None:
        self._active = True

    def check(self, now: float, watermarks: Mapping[int, int | None],
              log_starts: Mapping[int, int], reported_ends: Mapping[int, int],
              mine: Sequence[int]) -> tuple[float, list[int]]:
        """One check at monotonic ``now``: (seconds stalled, 0 while not; the partitions
        that wait without moving)."""
        watched = set(mine) or set(watermarks)
        waiting = set(unapplied_partitions({p: watermarks[p] for p in watched
                                            if p in watermarks}, log_starts, reported_ends))
        unmoved = [p for p in sorted(waiting)
                   if p in self._previous and self._previous[p] == watermarks[p]]
        self._previous = dict(watermarks)
        if self._active or not unmoved:
            self._active, self._stalled_since = False, None
            return 0.0, []
        if self._stalled_since is None:
            self._stalled_since = now
        return now - self._stalled_since, unmoved

    def stalled(self, seconds: float) -> bool:
        return bool(self.timeout_s) and seconds >= self.timeout_s
