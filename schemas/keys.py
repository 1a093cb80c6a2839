"""The Redis key contract: every key streamrec reads or writes is built here and nowhere else.

Ids are percent-encoded (RFC 3986 unreserved characters stay as they are), so an id holding
``:``, ``{``, ``}``, ``/``, NUL or non-ASCII text can neither collide with another key nor
move a key into another Redis Cluster slot. Per-user keys carry the hash tag ``{u:<id>}`` so a
user's keys live in one slot; shared keys have their own tags. See ``docs/redis-keys.md``.

Example
-------
>>> keys = RedisKeys("sr")
>>> keys.feed("alice:{1}")
'sr:{u:alice%3A%7B1%7D}:feed'
>>> decode_id(encode_id("naïve/ü\\x00"))
'naïve/ü\\x00'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, unquote

_ALREADY_SAFE = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch
#: How long an erasure marker (:meth:`RedisKeys.erased`) lives: longer than any feed round.
ERASURE_MARKER_TTL_S = 3600


@lru_cache(maxsize=1 << 18)  # the worker builds keys for the same ids over and over
def encode_id(raw_id: str) -> str:
    """Reversible, key-safe form of an id: everything but ``A-Za-z0-9_.-~`` is %XX (UTF-8)."""
    return raw_id if _ALREADY_SAFE(raw_id) else quote(raw_id, safe="")


def decode_id(encoded: str) -> str:
    """Inverse of :func:`encode_id`."""
    return unquote(encoded)


@dataclass(frozen=True)
class KeySpec:
    """Documentation of one key family (rendered in docs/redis-keys.md)."""

    pattern: str
    type: str
    ttl: str
    owner: str
    bound: str
    meaning: str


@dataclass(frozen=True)
class RedisKeys:
    """Builds every key under one prefix (``STREAMREC_KEY_PREFIX``)."""

    prefix: str = "sr"

    # --- per user (hash tag {u:<id>}: one slot per user) ------------------------------------
    def user_history(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{encode_id(user_id)}}}:hist"

    def feed(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{encode_id(user_id)}}}:feed"

    def erased(self, user_id: str) -> str:
        """The user's erasure marker (a token per erasure, short-lived): a feed computed
        before an erasure is not stored after it."""
        return f"{self.prefix}:{{u:{encode_id(user_id)}}}:erased"

    def user_history_seq(self, user_id: str) -> str:
        """The last commit applied to the user's history (Redis Cluster: see :meth:`redo`)."""
        return f"{self.prefix}:{{u:{encode_id(user_id)}}}:hist:seq"

    def user_history_pattern(self, id_prefix: str) -> str:
        """SCAN pattern of the history keys of users whose id starts with ``id_prefix``
        (encoding is per character, so an encoded prefix is a prefix of the encoded id; the
        encoded form holds no glob character)."""
        return f"{self.prefix}:{{u:{encode_id(id_prefix)}*}}:hist"

    def user_of_history_key(self, key: str) -> str:
        """Inverse of :meth:`user_history`."""
        return decode_id(key[len(self.prefix) + 4:-len("}:hist")])

    # --- per item (hash tag {i:<id>}) --------------------------------------------------------
    def item_description(self, item_id: str) -> str:
        return f"{self.prefix}:{{i:{encode_id(item_id)}}}:item"

    def neighbourhood(self, item_id: str) -> str:
        """String: the item's neighbourhood as the feed builder last counted it."""
        return f"{self.prefix}:{{i:{encode_id(item_id)}}}:hood"

    # --- shared ----------------------------------------------------------------------------
    @property
    def neighbourhoods_wanted(self) -> str:
        """Sorted set item → when serving last asked for its neighbourhood."""
        return f"{self.prefix}:{{hood}}:wanted"

    @property
    def trending(self) -> str:
        return f"{self.prefix}:{{trend}}:z"

    @property
    def trending_meta(self) -> str:
        return f"{self.prefix}:{{trend}}:meta"

    @property
    def bandit_shows(self) -> str:
        return f"{self.prefix}:{{bandit}}:shows"

    @property
    def bandit_clicks(self) -> str:
        return f"{self.prefix}:{{bandit}}:clicks"

    @property
    def item_first_seen(self) -> str:
        return f"{self.prefix}:{{items}}:first_seen"

    @property
    def feed_queue(self) -> str:
        return f"{self.prefix}:{{feedq}}:dirty"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:{{stats}}:counters"

    @property
    def stats_seq(self) -> str:
        return f"{self.prefix}:{{stats}}:seq"

    @property
    def bandit_seq(self) -> str:
        return f"{self.prefix}:{{bandit}}:seq"

    def stats_seq_of(self, topic: str, partition: int) -> str:
        """String: the last commit of source partition ``partition`` that added to the
        counters (owned layout on a Redis Cluster: commits are numbered per source
        partition)."""
        return f"{self.prefix}:{{stats}}:seq:{encode_id(topic)}:{int(partition)}"

    def bandit_seq_of(self, topic: str, partition: int) -> str:
        """String: the last commit of source partition ``partition`` that added bandit
        clicks (owned layout on a Redis Cluster)."""
        return f"{self.prefix}:{{bandit}}:seq:{encode_id(topic)}:{int(partition)}"

    @property
    def worker_reports(self) -> str:
        """Hash worker id → JSON of that worker's live figures (freshness, events/s)."""
        return f"{self.prefix}:{{stats}}:workers"

    # --- exactly-once bookkeeping -------------------------------------------------------------
    def watermark(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{{wm}}:{encode_id(topic)}:{int(partition)}"

    @property
    def state_layout(self) -> str:
        """String "shared" or "single": how the worker writes model state
        (STREAMREC_STATE_WRITER)."""
        return f"{self.prefix}:{{wm}}:layout"

    @property
    def item_partitions(self) -> str:
        """String: the owned layout's count of item (owner) partitions."""
        return f"{self.prefix}:{{wm}}:item-partitions"

    @property
    def state_writer(self) -> str:
        """String: the id of the worker holding the single-writer lease."""
        return f"{self.prefix}:{{wm}}:writer"

    @property
    def redo(self) -> str:
        """Hash {seq, commands}: the single writer's last commit on a Redis Cluster."""
        return f"{self.prefix}:{{wm}}:redo"

    def source_redo(self, topic: str, partition: int) -> str:
        """Hash {seq, commands}: the last commit of source partition ``partition``'s part of a
        chunk on a Redis Cluster (owned layout: each source partition commits on its own)."""
        return f"{self.prefix}:{{wm}}:redo:{encode_id(topic)}:{int(partition)}"

    def source_writer(self, topic: str, partition: int) -> str:
        """String: the process that was last assigned source partition ``partition`` (owned
        layout on a Redis Cluster); each commit of the partition's part checks it."""
        return f"{self.prefix}:{{wm}}:writer:{encode_id(topic)}:{int(partition)}"

    @property
    def held_partitions(self) -> str:
        """Hash ``<topic>:<partition>`` → why the worker holds that partition back."""
        return f"{self.prefix}:{{wm}}:held"

    @property
    def topic_ids(self) -> str:
        """Hash ``<topic>:<partition>`` → the Kafka topic id (KIP-516) whose log the
        partition's watermark counts offsets of."""
        return f"{self.prefix}:{{wm}}:topic_ids"

    # --- item partitions' owners (hash tag {own:<partition>}) ------------------------------
    def owner_applied(self, partition: int) -> str:
        """String (msgpack): item partition ``partition``'s owner's progress, [the last
        item-deltas offset consumed, source partition → the last offset applied]
        (docs/item-ownership.md)."""
        return f"{self.prefix}:{{own:{int(partition)}}}:applied"

    def owner_writer(self, partition: int) -> str:
        """String: the worker process last assigned item partition ``partition`` (its owner,
        on a Redis Cluster); each of the owner's commits checks it."""
        return f"{self.prefix}:{{own:{int(partition)}}}:writer"

    def owner_redo(self, partition: int) -> str:
        """Hash {seq, commands}: item partition ``partition``'s owner's last commit on a
        Redis Cluster."""
        return f"{self.prefix}:{{own:{int(partition)}}}:redo"

    def outbox(self, topic: str, partition: int) -> str:
        """Hash ``<source offset>:<owner partition>`` → that owner's item-delta record of
        the chunk ending there, until the owner applied it (STREAMREC_STATE_WRITER=owned)."""
        return f"{self.prefix}:{{wm}}:outbox:{encode_id(topic)}:{int(partition)}"

    @property
    def owned_epoch(self) -> str:
        """String: the epoch item-delta records are sent under (owned layout); owners drop
        records of any other."""
        return f"{self.prefix}:{{wm}}:epoch"

    def seen_events(self, bucket: int) -> str:
        """Set of the ids of applied events whose timestamps fall in time bucket ``bucket``."""
        return f"{self.prefix}:{{wm}}:seen:{int(bucket)}"

    def model_row_prefix(self) -> str:
        return f"{self.prefix}:m"

    def specs(self) -> list[KeySpec]:
        """The contract, one row per key family."""
        p = self.prefix
        return [
            KeySpec(f"{p}:{{u:<user>}}:feed", "string (JSON)", "STREAMREC_FEED_TTL_S (1 day)",
                    "serving feed builder", "STREAMREC_FEED_SIZE items",
                    "The user's feed: {user_id, items:[{item_id, score, reason, position, "
                    "propensity}], recommendation_id, generated_at, source, model_version, "
                    "policy}. Front ends GET it; send recommendation_id and position back "
                    "with the events it causes (docs/frontend.md)."),
            KeySpec(f"{p}:{{u:<user>}}:hist", "list of item ids, newest first",
                    "STREAMREC_HISTORY_TTL_S (7 days)", "stream worker",
                    "STREAMREC_HISTORY_LEN items",
                    "Recently interacted items; the feed's seen-filter."),
            KeySpec(f"{p}:{{u:<user>}}:hist:seq", "string (integer)",
                    "STREAMREC_HISTORY_TTL_S", "stream worker (Redis Cluster only)", "one key",
                    "The last commit (`sr:{wm}:redo` seq) added to the user's history: a commit "
                    "applied again adds nothing."),
            KeySpec(f"{p}:{{u:<user>}}:erased", "string (random token)",
                    "ERASURE_MARKER_TTL_S (1 hour)", "stream worker (an erasure)", "one key",
                    "Set anew by each erasure of the user (docs/events.md#erasure). The feed "
                    "builder reads it before computing a round and stores a feed only if it "
                    "is unchanged: a feed computed from state the erasure deleted is never "
                    "stored after it."),
            KeySpec(f"{p}:{{trend}}:z", "sorted set item → forward-decayed score", "none",
                    "stream worker", "STREAMREC_TRENDING_MAX_ITEMS members (+ up to 10 %)",
                    "Trending items (`online_models.trending.TrendingModel`: w by event type, "
                    "half-life STREAMREC_TRENDING_HALF_LIFE_S). Score = Σ w·2^((t − "
                    "landmark)/half_life); divide by "
                    "2^((now − landmark)/half_life) for the decayed value. Order is the ranking."),
            KeySpec(f"{p}:{{trend}}:meta", "hash {landmark, half_life_s, last_ts, seq}", "none",
                    "stream worker", "4 fields", "Landmark of the trending scores; last_ts is "
                    "the newest event time seen (the stream's clock); seq (Redis Cluster only) "
                    "the last commit added."),
            KeySpec(f"{p}:{{bandit}}:shows", "hash item → count", "none", "feed builder / API",
                    "items served at exploration positions",
                    "Times each item was shown at a reserved (exploration) position."),
            KeySpec(f"{p}:{{bandit}}:clicks", "hash item → count", "none", "stream worker",
                    "items in shows (others are not counted)",
                    "Engagements (click, view, dwell, like, cart, purchase) carrying a "
                    "recommendation_id and a reserved position: Thompson sampling's successes."),
            KeySpec(f"{p}:{{bandit}}:seq", "string (integer)", "none",
                    "stream worker (Redis Cluster only)", "one key",
                    "The last commit added to the clicks."),
            KeySpec(f"{p}:{{i:<item>}}:item", "string (JSON item description)", "none",
                    "stream worker (items topic)", "one per described item",
                    "The item's latest description, as sent (schemas/items.py: item_id, "
                    "timestamp, categories, tags, title, published_at, available): what front "
                    "ends show and explanations name."),
            KeySpec(f"{p}:{{i:<item>}}:hood", "string (msgpack, format 1 of "
                    "online_models.session)", "3 × STREAMREC_NEIGHBOURHOODS_INTERVAL_S (or 3 "
                    "rounds, when longer)", "feed builder (serving/neighbour_rows.py)",
                    "one per wanted item", "The item's neighbourhood (the items of its recent "
                    "sessions, their counts and session counts, its next-item rules), counted "
                    "once for every API process; an API process counts the ones absent itself."),
            KeySpec(f"{p}:{{hood}}:wanted", "sorted set item → time (s)", "none (members "
                    "older than STREAMREC_NEIGHBOURHOODS_WANTED_S deleted every round)",
                    "serving (ZADD), feed builder (trims)",
                    "STREAMREC_NEIGHBOURHOODS_MAX_ITEMS members",
                    "Items whose neighbourhoods serving asked for, and when: what the feed "
                    "builder counts and publishes."),
            KeySpec(f"{p}:{{items}}:first_seen", "sorted set item → first event time", "none",
                    "stream worker", "10 × STREAMREC_TRENDING_MAX_ITEMS members (the oldest "
                    "dropped once 10 % more are held)",
                    "When each item was first seen: serving's freshness boost."),
            KeySpec(f"{p}:{{feedq}}:dirty", "set of user ids", "none", "stream worker (add), "
                    "feed builder (pop)",
                    "STREAMREC_FEED_QUEUE_MAX users (random ones dropped past it)",
                    "Users whose feed must be rebuilt."),
            KeySpec(f"{p}:{{stats}}:counters", "hash", "none", "stream worker",
                    "a few fields", "events_applied, dlq_messages, dlq_events, batches, "
                    "skipped_redelivered (messages), skipped_duplicates (events), erasures "
                    "(requests applied): counted once per source offset. dlq_item_messages: "
                    "dead letters of the items and item-deltas topics, counted as delivered "
                    "(a message redelivered after a crash counts again)."),
            KeySpec(f"{p}:{{stats}}:seq", "string (integer)", "none",
                    "stream worker (Redis Cluster only)", "one key",
                    "The last commit added to the counters."),
            KeySpec(f"{p}:{{stats}}:workers", "hash worker id → JSON", "none (fields "
                    "older than 1 hour are deleted by the next report)", "each stream worker "
                    "(its own field)", "one field per live worker",
                    "Live figures every STREAMREC_WORKER_REPORT_INTERVAL_S: {worker, updated_at, "
                    "events_per_s, freshness_p50_ms, freshness_p99_ms, freshness_samples, "
                    "assigned}; what GET /v1/stats and the feed explorer show."),
            KeySpec(f"{p}:{{wm}}:<topic>:<partition>", "string (integer)", "none",
                    "stream worker", "one per source partition",
                    "Highest offset whose effects are in Redis; written in the same MULTI/EXEC "
                    "as those effects. Offsets at or below it are skipped on redelivery."),
            KeySpec(f"{p}:{{wm}}:item-partitions", "string: a count", "none",
                    "stream worker (owned layout)", "one key", "How many owner partitions "
                    "item-side state is split into (STREAMREC_TOPIC_PARTITIONS, the item-deltas "
                    "topic's partitions): an item's rows have one writer only while every "
                    "worker splits by the same count. Set by the first owned worker; a worker "
                    "configured otherwise refuses to start (docs/item-ownership.md)."),
            KeySpec(f"{p}:{{wm}}:layout", "string: shared, single or owned", "none",
                    "stream worker", "one key", "How model state is laid out "
                    "(STREAMREC_STATE_WRITER): shared = rows as sorted sets that every worker "
                    "adds to; single = rows as msgpack strings written whole by the one worker "
                    "that holds the lease; owned = rows as in single, each written whole by its "
                    "one owner (a user's partition's worker, an item's owner partition). Set "
                    "by the first worker; a worker or reader configured otherwise refuses to "
                    "start."),
            KeySpec(f"{p}:{{wm}}:writer",
                    "string (`[<static member>/]<uuid>/lease-ms=<lease in ms>`)",
                    "STREAMREC_STATE_WRITER_LEASE_S, renewed by its holder", "stream worker "
                    "(single writer)", "one key", "The lease of the worker that owns model "
                    "state when STREAMREC_STATE_WRITER=single; every commit checks and renews "
                    "it. The lease length in the name dates the last renewal (from what is "
                    "left of it) for a process of the same static member taking it over on a "
                    "Redis Cluster."),
            KeySpec(f"{p}:{{wm}}:redo", "hash {seq, commands}", "none",
                    "stream worker (single writer on a Redis Cluster)", "one batch's writes",
                    "The last commit: its number (growing; a writer taking over numbers on "
                    "from it or from the clock in ms, whichever is larger) and its writes "
                    "outside the {wm} slot (msgpack), written in one MULTI/EXEC with the "
                    "watermarks, then applied; "
                    "applied again after a crash or a failed write (every write in it is an "
                    "overwrite or guarded by a seq key: applying twice changes nothing)."),
            KeySpec(f"{p}:{{wm}}:redo:<topic>:<partition>", "hash {seq, commands}", "none",
                    "stream worker (owned layout on a Redis Cluster)",
                    "one chunk part's writes per source partition",
                    "As `{wm}:redo`, per source partition: each source partition's part of a "
                    "chunk commits on its own, numbered on from this record by the "
                    "partition's next worker, which applies it again before its first commit "
                    "of it, or 5 s after the assignment if no batch comes. Its adds to "
                    "shared keys are guarded per source partition: "
                    "`{stats}:seq:<topic>:<partition>`, "
                    "`{bandit}:seq:<topic>:<partition>` and the trending meta's "
                    "`seq:<topic>:<partition>` field."),
            KeySpec(f"{p}:{{wm}}:writer:<topic>:<partition>", "string (process id)",
                    "100 years, set again by each check of it: what is left dates the "
                    "holder's last check", "stream worker (owned layout on a Redis Cluster)",
                    "one key per source partition",
                    "The worker process the group last assigned the source partition, written "
                    "at the assignment; each commit of the partition's part WATCHes it, so a "
                    "process evicted without knowing (frozen past the session timeout) writes "
                    "nothing of it after its successor took over, and exits. Deleted by its "
                    "holder when it gives the partition up at a rebalance, everything "
                    "written; else the next writer waits until STREAMREC_CLUSTER_CLAIM_WINDOW_S "
                    "has passed since the holder last checked it (docs/reliability.md)."),
            KeySpec(f"{p}:{{wm}}:held", "hash <topic>:<partition> → reason", "none",
                    "stream worker", "one field per held partition",
                    "Partitions whose Redis progress does not fit the Kafka log (the log went "
                    "backwards, or retention deleted unapplied offsets): nothing of them is "
                    "applied until an operator runs `streamrec offsets --reset` "
                    "(docs/reliability.md)."),
            KeySpec(f"{p}:{{wm}}:topic_ids", "hash <topic>:<partition> → topic id", "none",
                    "stream worker; `streamrec offsets --reset`", "one field per partition",
                    "The Kafka topic id (KIP-516) of the log each watermark counts offsets "
                    "of. A different id (topic deleted and recreated, broker data lost) "
                    "holds the partition even where its new log has grown past the "
                    "watermark; a reset records the new id."),
            KeySpec(f"{p}:{{wm}}:outbox:<topic>:<partition>", "hash <source offset>:<owner "
                    "partition> → record (msgpack)", "none", "stream worker (owned layout) "
                    "adds; the owner deletes", "the records owners have not applied yet",
                    "Item-delta records of a source partition's chunks, written in the chunk's "
                    "MULTI/EXEC with its watermark; sent in offset order to the item-deltas "
                    "topic, and deleted by their owner in the commit that applies them "
                    "(docs/item-ownership.md)."),
            KeySpec(f"{p}:{{wm}}:epoch", "string (random id)", "none", "stream worker (owned "
                    "layout)", "one key", "The epoch item-delta records are sent under (their "
                    "Kafka key). A starting worker, or one that finds Redis went back, makes a "
                    "new one: owners drop records of other epochs (sent before a loss of Redis "
                    "writes), and what owners have not applied is sent again from the "
                    "outboxes."),
            KeySpec(f"{p}:{{own:<partition>}}:applied", "string (msgpack [item-deltas "
                    "offset, map source partition → offset])", "none",
                    "item partition owner (owned layout: docs/item-ownership.md)",
                    "one key per item partition",
                    "The owner's progress: the last item-deltas offset it consumed (where "
                    "its successor resumes) and the last source offset whose item deltas its "
                    "rows hold; written with those rows (one MULTI/EXEC, or with its redo "
                    "record on a Redis Cluster). Records at or below it are dropped as "
                    "re-sends."),
            KeySpec(f"{p}:{{own:<partition>}}:writer", "string (process id)",
                    "100 years, set again by each check of it (as the source partitions')",
                    "item partition owner (Redis Cluster only)", "one key per item partition",
                    "The worker process the group last assigned the item partition, written "
                    "at the assignment; each owner commit WATCHes it, and it is deleted at a "
                    "rebalance or waited out after a crash, as `{wm}:writer:<topic>:<partition>` "
                    "is for source partitions."),
            KeySpec(f"{p}:{{own:<partition>}}:redo", "hash {seq, commands}", "none",
                    "item partition owner (Redis Cluster only)", "one commit's writes",
                    "The owner's last commit outside its slot (overwrites only), written with "
                    "its offsets, then applied; applied again by the next owner with its "
                    "first record, or 5 s after the assignment if none comes."),
            KeySpec(f"{p}:{{wm}}:seen:<bucket>", "set of event ids",
                    "2 × STREAMREC_DEDUP_TTL_S after its last write", "stream worker",
                    "ids of events applied within the TTL (~70 B each)",
                    "Event ids already applied, bucketed by floor(event timestamp / "
                    "STREAMREC_DEDUP_TTL_S): a producer duplicate (same id and timestamp, new "
                    "offset) falls in the same bucket and is dropped."),
            KeySpec(f"{p}:m:<model>:<table>:{{<key>}}", "sorted set (rows; a msgpack map "
                    "when STREAMREC_STATE_WRITER=single, except catalogue tables such as "
                    "mf:catalog, which stay sorted sets), msgpack map (partition-local rows) "
                    "or string (float32 vector)",
                    "refreshed by each write: STREAMREC_USER_STATE_TTL_S (30 days) for "
                    "partition-local state, STREAMREC_ITEM_STATE_TTL_S (90 days) for the rest; "
                    "evictable (volatile-lru) at maxmemory. STREAMREC_STATE_WRITER=single: "
                    "strings (rows, vectors) carry no TTL while the writer tracks them (up to "
                    "STREAMREC_STATE_WRITER_HELD_KEYS per table, not evictable); it deletes "
                    "one idle past its TTL at its next commit, gives the ones it stops "
                    "tracking a TTL, and at start gives every one without a TTL its table's. "
                    "STREAMREC_STATE_WRITER=owned: the same for item-side strings, by their "
                    "owner partition (a worker whose owners start gives untimed ones a TTL); "
                    "partition-local ones carry none while written, get their table's full "
                    "TTL once unwritten a tenth of it (another worker may write them after a "
                    "rebalance: never deleted, never an earlier deadline), and those a "
                    "worker left get it from the next rebalance's sweep",
                    "stream worker (online models)",
                    "per-table caps (docs/models.md, models table)",
                    "Online model state (state/redis_store.py RedisStore): e.g. "
                    "session:isess:{item} = the item's recent sessions, "
                    "session:sess:{session} = a session's "
                    "items and positions (msgpack), mf:item:{item} = factors. On a Redis "
                    "Cluster: `sr:m:<model>:<table>:{b<n>}:<key>`, n = CRC-32 of the "
                    "encoded key mod 256 (a batch's reads and writes: one call per bucket)."),
            KeySpec(f"{p}:m:<model>:expiry", "hash <table> → TTL in ms", "none",
                    "stream worker (single writer; owned: workers and item partition "
                    "owners)",
                    "one field per table",
                    "The TTL of each table whose keys the single writer (or an owner) writes "
                    "without one and expires itself; a writer taking over gives that TTL to "
                    "every key of the table that has none (state/redis_store.py "
                    "give_untimed_keys_ttls)."),
        ]
