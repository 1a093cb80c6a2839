"""The one settings object. Every field reads ``STREAMREC_<FIELD>`` from the environment.

Example
-------
>>> from infra.settings import Settings
>>> Settings(redis_url="redis://127.0.0.1:6380/0").key_prefix
'sr'
"""

from __future__ import annotations

import ssl
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from online_models.trending import DEFAULT_HALF_LIFE_S, DEFAULT_MAX_ITEMS


#: Shortest accepted API key (a guessable key is as good as none).
MIN_API_KEY_CHARS = 16


def _weight_pairs(text: str) -> dict[str, float]:
    """``name=weight,...`` (already checked against the setting's pattern) as a dict."""
    return {name: float(weight) for name, weight in
            (pair.split("=") for pair in text.split(",") if pair)}


class ServicesNotSet(ValueError):
    """A role that needs Kafka and Redis started without their addresses."""


class Settings(BaseSettings):
    """Runtime configuration shared by every process role (worker, API, feed builder, producer).

    Empty ``kafka_bootstrap`` / ``redis_url`` mean "not configured": ``streamrec demo`` then
    starts embedded services; the other roles refuse to start without them.
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="forbid")

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap: str = Field("", description="Kafka bootstrap servers, host:port[,host:port].")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol, passed to every client.")
    kafka_sasl_mechanism: str = Field("", description="SASL mechanism (PLAIN, SCRAM-SHA-256, ...).")
    kafka_sasl_username: str = Field("", description="SASL username.")
    kafka_sasl_password: str = Field("", description="SASL password.")
    kafka_ssl_cafile: str = Field("", description="CA bundle for SSL/SASL_SSL (every Kafka "
                                  "client: worker, SDK, API, feed builder, vector tail, admin).")
    kafka_ssl_certfile: str = Field("", description="Client certificate (PEM) for mutual TLS.")
    kafka_ssl_keyfile: str = Field("", description="Private key (PEM) of the client certificate.")
    topic_interactions: str = Field("interactions", description="Topic of interaction events.")
    topic_dlq: str = Field("interactions.dlq", description="Dead-letter topic for invalid input.")
    topic_item_vectors: str = Field("item-vectors", description="Compacted topic of changed item "
                                    "vectors (key: item id), tailed by the ANN index.")
    topic_impressions: str = Field("impressions", description="Topic of served lists with "
                                   "propensities (the impression log; key: user id).")
    topic_items: str = Field("items", description="Compacted topic of item descriptions "
                             "(key: item id; schemas/items.py): the content model's input.")
    topic_item_deltas: str = Field("item-deltas", description="STREAMREC_STATE_WRITER=owned: "
                                   "item-side writes as delta records, one partition per owner "
                                   "(docs/item-ownership.md).")
    topic_partitions: int = Field(4, ge=1, le=1024, description="Partitions of created topics.")
    app_id: str = Field("streamrec", description="Faust application id (consumer group).")
    kafka_session_timeout_s: float = Field(10.0, gt=0, description="Consumer session timeout.")
    kafka_rebalance_timeout_s: float = Field(10.0, gt=0, description="Consumer rebalance timeout.")
    kafka_group_instance_id: str = Field(
        "", pattern=r"^[A-Za-z0-9._-]{0,249}$", description="Worker: static group membership "
        "(KIP-345), an id unique to this worker and stable across its restarts (a pod name, "
        "say). Restarted within STREAMREC_KAFKA_SESSION_TIMEOUT_S, it gets its partitions back "
        "without a rebalance; it does not leave the group when it stops, so its partitions "
        "wait out the session timeout. Empty: dynamic membership (a worker killed -9 holds its "
        "partitions until the session timeout; one stopped cleanly leaves at once).")
    kafka_ack_timeout_s: float = Field(
        5.0, gt=0, le=120, description="How long the API and feed builder wait for Kafka to "
        "take a publish (impression log, POST /v1/events) before answering 503.")
    log_check_interval_s: float = Field(
        10.0, gt=0, description="How often the worker checks that Redis progress fits the Kafka "
        "log: offsets and topic id (a log that went backwards, or a recreated topic, holds its "
        "partition: docs/reliability.md).")
    worker_stall_timeout_s: float = Field(
        120.0, ge=0, description="A worker that receives no batch for this long while records "
        "wait unapplied in its partitions (seen by an independent read of the log) exits 75 "
        "to be restarted, resuming exactly once from Redis's watermarks; 0 = never.")

    # --- Redis -----------------------------------------------------------------------------
    redis_url: str = Field("", description="redis:// or rediss:// URL (password in the URL); "
                           "redis+cluster:// or rediss+cluster:// for a Redis Cluster (any "
                           "node, or several: redis+cluster://h1:6379,h2:6379,h3:6379, asked "
                           "in turn; needs STREAMREC_STATE_WRITER=single or owned).")
    key_prefix: str = Field("sr", pattern=r"^[a-z][a-z0-9_]{0,15}$",
                            description="Prefix of every Redis key (see schemas/keys.py).")

    # --- Limits on input -------------------------------------------------------------------
    max_message_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted message.")

    # --- Worker ----------------------------------------------------------------------------
    kafka_fetch_max_wait_ms: int = Field(50, ge=1, le=1500, description="Longest a worker's "
                                         "fetch waits at the broker for data (latency floor on "
                                         "brokers that always wait it out).")
    kafka_producer_linger_ms: int = Field(
        20, ge=0, description="How long the worker's producer waits to batch records (item "
        "vectors, dead letters) into one request.")
    worker_batch_max: int = Field(2000, ge=1, description="Messages taken per agent batch.")
    worker_apply_max_events: int = Field(
        16000, ge=1, description="Events per Redis transaction (an agent batch is applied in "
        "chunks of this size; at a steady rate chunks are smaller, bounded by "
        "STREAMREC_WORKER_BATCH_WITHIN_S). Larger: hot rows written once for more events, so "
        "less CPU per event under backlog, but Redis serves no one else during a transaction "
        "(16,000: a feed read waits up to ~80 ms while a backlog drains, 4,000: ~30 ms; "
        "docs/benchmarks.md, session 35).")
    worker_cached_local_rows: int = Field(
        100_000, ge=0, description="Partition-local model rows (sessions, windows, user "
        "factors) the worker keeps in memory per table, so it need not read back what it wrote "
        "(0: none). ~1 KB per typical session row, ~6 KB for a full one.")
    worker_batch_within_s: float = Field(0.05, gt=0, description="Max wait to fill a batch.")
    worker_web_port: int = Field(6066, ge=0, le=65535,
                                 description="Faust web port (bound to 127.0.0.1).")
    vector_publish_interval_s: float = Field(0.25, gt=0, description="Changed item vectors are "
                                             "coalesced and published at most this often.")
    vector_publish_max: int = Field(500, ge=1, description="At most this many item vectors "
                                    "are published per interval (new items first, then the "
                                    "largest moves; the rest wait).")
    vector_publish_min_change: float = Field(0.05, ge=0, description="A changed item vector is "
                                             "published once it moved this far (relative L2) "
                                             "from its last published version (0 = always).")
    trainer_dir: str = Field("", description="Folder of the trainer's checkpoints "
                             "(<model>/v<version>/ and <model>/CURRENT), shared with the API and "
                             "feed builder, which serve the CURRENT version; empty: no trainer, "
                             "no nearline source.")
    trainer_keep: int = Field(5, ge=1, description="Checkpoint versions the trainer keeps "
                              "(what --rollback can go back to).")
    trainer_device: str = Field(
        "cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="Where the trainer trains its "
        "PyTorch model: cpu, cuda (or cuda:N: refused at start when torch sees no GPU) or auto "
        "(a GPU where one is visible). Versions are served on the CPU either way.")
    trainer_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port "
                                      "of the trainer (0 = off): events learned, versions and "
                                      "when the last was published (stream/trainer_metrics.py).")
    trainer_metrics_host: str = Field("127.0.0.1", description="Bind address of the trainer's "
                                      "/metrics.")
    worker_report_interval_s: float = Field(
        2.0, ge=0, description="How often each worker writes its live figures (events/s, "
        "freshness p50/p99 over the last minute) to Redis for GET /v1/stats; 0 = never.")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port of "
                                     "the worker (0 = off).")
    log_format: Literal["text", "json"] = Field("text", description="Worker log lines: text or "
                                                "one JSON object per line.")
    worker_metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics.")
    worker_data_dir: str = Field("", description="Faust data dir (default: a temp dir).")
    redis_retry_max_s: float = Field(5.0, gt=0, description="Cap of the Redis retry backoff.")
    redis_wait_replicas: int = Field(
        0, ge=0, le=16, description="The worker's commits of model state (its batches and, "
        "owned, its owners') are done only once this many replicas of every Redis primary "
        "they wrote acknowledged them (Redis WAIT): a primary that fails over then loses no "
        "acknowledged commit. While fewer acknowledge, the commit waits (a warning and "
        "streamrec_redis_replica_waits_total per STREAMREC_REDIS_WAIT_TIMEOUT_MS) and nothing "
        "newer is applied. 0: no wait; Redis replication is asynchronous "
        "(docs/reliability.md, Redis Cluster).")
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, description="How long one WAIT for STREAMREC_REDIS_WAIT_REPLICAS lasts "
        "before a warning; the commit then waits again.")
    trending_half_life_s: float = Field(DEFAULT_HALF_LIFE_S, gt=0,
                                        description="Half-life of trending scores.")
    trending_max_items: int = Field(DEFAULT_MAX_ITEMS, ge=10, description="Trending items kept "
                                    "(top-N; first-seen times for 10 × as many).")
    history_len: int = Field(50, ge=1, le=10_000, description="Recent items kept per user.")
    history_ttl_s: int = Field(7 * 86400, ge=60, description="TTL of a user's history.")
    user_state_ttl_s: int = Field(30 * 86400, ge=0, description="TTL of model state owned by a "
                                  "user or session (session items, co-occurrence windows, user "
                                  "factors), refreshed by every write (0 = none).")
    item_state_ttl_s: int = Field(90 * 86400, ge=0, description="TTL of item-side model state "
                                  "(items' recent sessions and counts, item factors), refreshed by "
                                  "every write (0 = none). Under memory pressure Redis evicts "
                                  "the least recently used of these keys first (volatile-lru).")
    feed_queue_max: int = Field(1_000_000, ge=1, description="Users waiting for a feed rebuild; "
                                "beyond it, random ones are dropped (their next event queues "
                                "them again; the API computes a missing feed on demand).")
    state_writer: Literal["shared", "single", "owned"] = Field(
        "shared", description="shared: every worker adds its increments to model state in "
        "Redis (any number of workers). single: ONE worker owns the online models' state, "
        "holds it in memory and writes changed rows whole (msgpack strings) in each batch's "
        "transaction; Redis is the read model (~60 % less Redis CPU per event, "
        "docs/benchmarks.md). A lease in Redis keeps a second worker from writing. owned: a "
        "worker group where each key has one writer: user-side state by the user's "
        "partition's worker, item-side state by the item's owner partition "
        "(docs/item-ownership.md; one Redis server or a Redis Cluster). Serving must run with "
        "the same value. Switching needs empty model state (docs/reliability.md).")
    owned_local_handoff: bool = Field(
        True, description="owned: item-delta records whose owner partition this worker holds "
        "are applied in this process as soon as their chunk commits (read from the outbox, as "
        "the relay reads them) instead of going through the item-deltas topic; records for "
        "other workers' owner partitions still go through Kafka (docs/item-ownership.md).")
    owned_handoff_interval_s: float = Field(
        0.0, ge=0, le=1, description="owned, local hand-off: the least time between two "
        "hand-offs (0: one as each chunk commits). Longer: each owner applies and commits "
        "(rewrites its changed rows) once per interval, for less CPU, and item-side state "
        "(rows, vectors) reaches Redis up to this much later; user-side state is not delayed "
        "(docs/benchmarks.md, session 33).")
    cluster_claim_window_s: float = Field(
        3.0, gt=0, description="Redis Cluster (owned or single): a commit's writes to other "
        "nodes are sent within this many seconds of the check that the worker is still the "
        "writer (its partition's claim, or the lease), else never (it exits: frozen, or Redis "
        "stalled), and a worker taking a partition (or the lease) over from one that did not "
        "give it up waits until this long has passed since the predecessor's last check "
        "(owned: dated by Redis; single: this long) before writing: nothing of the "
        "predecessor's can land over its rows (docs/reliability.md). Single: the lease must "
        "last longer.")
    state_writer_lease_s: float = Field(10.0, ge=1, description="single: how long the writer's "
                                        "lease lasts unrenewed (a restarted worker waits at "
                                        "most this long for its predecessor's).")
    state_writer_held_keys: int = Field(
        1_000_000, ge=1000, description="single: model-state keys the writer keeps in memory "
        "per table; past it, the oldest (already in Redis) are dropped and read again if met. "
        "Also the keys per table it writes without a Redis TTL and expires itself (cheaper "
        "for Redis, but not evictable): past it, the oldest written get a TTL.")
    live_models: str = Field("session,mf", pattern=r"^[a-z_]*(,[a-z_]+)*$",
                             description="Online models the worker updates (comma-separated, "
                                         "names from online_models/registry.py; empty = none). "
                                         "Without cooc, co-occurrence neighbours are scored at "
                                         "read time from the session model's state. Models "
                                         "trained in versions (two_tower, gru4rec, sasrec, and the "
                                         "mixtures holding them: user_blend, session_seq) are "
                                         "refused at start: `streamrec trainer` runs them.")
    session_rules: Literal["read", "written"] = Field(
        "read", description="How the session model scores next-item rules: read (at query time "
        "from each item's recent sessions: the worker counts no pairs) or written (counted per "
        "event: YooChoose test HR@20 0.695 against 0.691, ~6 µs more worker CPU per event). "
        "Worker and serving must run with the same value.")
    dedup_ttl_s: int = Field(600, ge=1, description="How long applied event ids are remembered "
                                                    "to drop producer duplicates (memory: ~70 B "
                                                    "× events/s × 2 × this).")

    # --- Feeds and API ---------------------------------------------------------------------
    feed_size: int = Field(20, ge=1, le=1000, description="Items per feed.")
    feed_ttl_s: int = Field(86400, ge=60, description="TTL of a written feed.")
    feed_refresh_batch: int = Field(500, ge=1, description="Users rebuilt per feed-builder round.")
    feed_refresh_interval_s: float = Field(0.5, gt=0, description="Feed-builder poll interval.")
    feeds_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port of "
                                    "the feed builder (0 = off): feeds written, round seconds, "
                                    "users queued, failed rounds (serving/feed_metrics.py).")
    feeds_metrics_host: str = Field("127.0.0.1", description="Bind address of the feed "
                                    "builder's /metrics.")
    freshness_weight: float = Field(0.0, ge=0, description="Boost of never-before-seen items in "
                                    "ranking: weight · 2^(−age/1 day) (0 = off).")
    candidates_per_source: int = Field(
        50, ge=1, le=10_000, description="Serving: how many candidates each source offers a "
        "list before blending. Fewer cost less CPU per list and, on both validation splits, "
        "50 scored a little higher than 100, but leave re-ranking fewer tail items: exposure "
        "goes a little more to the head (docs/benchmarks.md, session 27).")
    serving_rows_max_age_s: float = Field(
        1.0, ge=0, description="Serving: how long an item's neighbour rows (session-kNN and "
        "read-time co-occurrence, computed from its recent sessions) and next-item rules are "
        "reused for other requests; 0 computes them per request. A request's own items are "
        "always its own. The feed builder's neighbourhood rounds keep items' session counts "
        "as long.")
    neighbourhoods_interval_s: float = Field(
        1.0, ge=0, description="Serving: how often the feed builder counts the item "
        "neighbourhoods serving asked for and publishes them for every API process "
        "(serving/neighbour_rows.py); 0: off, each API process counts its own.")
    neighbourhoods_wanted_s: float = Field(
        60.0, gt=0, description="Serving: an item's neighbourhood is published while some "
        "serving process asked for it within this long.")
    neighbourhoods_recount_s: float = Field(
        30.0, ge=0, description="Serving: a published neighbourhood whose recent sessions "
        "and their items did not change is kept (not counted again) for up to this long: the "
        "most its members' session counts and idf's N lag (the first time after a random "
        "half to all of it, so that items counted together are not recounted together); 0 "
        "counts every one each round.")
    neighbourhoods_max_items: int = Field(
        100_000, ge=1, description="Serving: at most this many (the most recently asked "
        "for) neighbourhoods are published.")
    source_weights: str = Field(
        "", pattern=r"^$|^[a-z_0-9]+=\d+(\.\d+)?(,[a-z_0-9]+=\d+(\.\d+)?)*$",
        description="Serving: weights of candidate sources for this deployment, over the "
        "defaults (SOURCE_WEIGHTS in serving/rerank.py), as name=weight,...; 0 "
        "turns a source off. Example: content=1.5 where items carry descriptive attributes "
        "(MovieLens validation HR@10 0.1144 against 0.1086 at the default 0.1); keep 0.1 where "
        "many items share their top content score, or content takes every list.")
    ann_max_items: int = Field(200_000, ge=1, description="Items the serving ANN index holds; the "
                               "least recently updated are evicted beyond it.")
    ann_snapshot_dir: str = Field("", description="Where a serving process snapshots its ANN "
                                  "index and item-vector offsets (empty = no snapshots).")
    ann_snapshot_interval_s: float = Field(300.0, gt=0, description="Seconds between ANN "
                                           "snapshots.")
    explore_policy: Literal["epsilon-greedy", "thompson-sampling", "none"] = Field(
        "epsilon-greedy", description="Exploration over the reserved positions of served lists.")
    explore_epsilon: float = Field(0.1, ge=0, le=1, description="ε of ε-greedy exploration.")
    explore_positions: str = Field("3,7", pattern=r"^$|^\d+(,\d+)*$", description="Positions "
                                   "(0-based) reserved for exploration.")
    api_keys: str = Field("", description="Comma-separated API keys (each ≥ 16 characters, no "
                          "spaces); when set, /v1 requests need the header X-API-Key with one of "
                          "them. A value with no usable key refuses to start (never open).")
    api_open_lists_per_s: float = Field(20.0, ge=0, description="Without API keys: lists computed "
                                        "on demand per second per API process (each is logged "
                                        "to the impressions topic); beyond it → 429 with "
                                        "Retry-After. Stored feeds are not limited.")
    api_batch_linger_ms: float = Field(0.0, ge=0, le=100, description="On-demand lists: how "
                                       "long the oldest waiting request may wait for others "
                                       "to share its compute pass, while requests come faster "
                                       "than one per linger. Bigger passes cost less CPU per "
                                       "list (4 ms at 1,000 lists/s: 21-31 % less, p99 3-8 "
                                       "ms more); 0 = take what is waiting (lowest latency).")
    api_host: str = Field("127.0.0.1", description="API bind address.")
    api_port: int = Field(8080, ge=0, le=65535, description="API port.")
    api_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port of "
                                  "the API (0 = off): on-demand lists' seconds by stage "
                                  "(serving/metrics.py); with --workers N, their sum.")
    api_metrics_host: str = Field("127.0.0.1", description="Bind address of the API's /metrics.")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("api_keys")
    @classmethod
    def _api_keys_fail_closed(cls, value: str) -> str:
        """Set but blank (" , ") or with a short key: refuse, rather than serve unguarded."""
        if not value:
            return value
        keys = [k.strip() for k in value.split(",")]
        if not any(keys):
            raise ValueError("STREAMREC_API_KEYS is set but holds no key: unset it to run "
                             "without keys, or give keys of 16+ characters")
        bad = [k for k in keys if len(k) < MIN_API_KEY_CHARS or any(c.isspace() for c in k)]
        if bad:
            raise ValueError(f"STREAMREC_API_KEYS: {len(bad)} key(s) empty, shorter than "
                             f"{MIN_API_KEY_CHARS} characters or holding spaces")
        return ",".join(keys)

    @field_validator("source_weights")
    @classmethod
    def _known_sources(cls, value: str) -> str:
        """Only sources the serving pipeline blends: a misspelt name must not be ignored."""
        if value:
            from serving.rerank import SOURCE_WEIGHTS

            unknown = sorted(set(_weight_pairs(value)) - set(SOURCE_WEIGHTS))
            if unknown:
                raise ValueError(f"STREAMREC_SOURCE_WEIGHTS: unknown source(s) "
                                 f"{', '.join(unknown)}; known: {', '.join(SOURCE_WEIGHTS)}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _cluster_seeds_are_host_port(cls, value: str) -> str:
        from infra.redis_client import CLUSTER_SCHEMES, cluster_seeds

        if value.startswith(CLUSTER_SCHEMES):
            try:
                cluster_seeds(value)
            except ValueError as exc:
                raise ValueError(f"STREAMREC_REDIS_URL: {exc}") from None
        return value

    @model_validator(mode="after")
    def _lease_outlasts_the_claim_window(self) -> "Settings":
        """On a Redis Cluster, a lapsed single-writer lease is safe to take without waiting
        only if it lasts longer than the claim window (docs/reliability.md, Redis Cluster)."""
        from infra.redis_client import CLUSTER_SCHEMES

        on_cluster = self.redis_url.startswith(CLUSTER_SCHEMES)
        if (on_cluster and self.state_writer == "single"
                and self.state_writer_lease_s <= self.cluster_claim_window_s):
            raise ValueError(f"STREAMREC_STATE_WRITER_LEASE_S ({self.state_writer_lease_s:g}) "
                             f"must exceed STREAMREC_CLUSTER_CLAIM_WINDOW_S "
                             f"({self.cluster_claim_window_s:g})")
        return self

    @property
    def source_weight_overrides(self) -> dict[str, float]:
        """:attr:`source_weights` parsed: the deployment's weight per source it names."""
        return _weight_pairs(self.source_weights)

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k for k in self.api_keys.split(",") if k)

    @property
    def live_model_names(self) -> list[str]:
        return [name for name in self.live_models.split(",") if name]

    @property
    def model_options(self) -> dict[str, dict]:
        """Constructor options of the live models set here, by model name."""
        return {"session": {"rules": self.session_rules}}

    @property
    def exploration_positions(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.explore_positions.split(",") if p)

    def kafka_client_options(self) -> dict[str, str]:
        """Security options in the form kafka-python takes."""
        options: dict[str, str] = {"security_protocol": self.kafka_security_protocol}
        for name in ("cafile", "certfile", "keyfile"):
            if getattr(self, f"kafka_ssl_{name}"):
                options[f"ssl_{name}"] = getattr(self, f"kafka_ssl_{name}")
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password
        return options

    def kafka_ssl_context(self) -> ssl.SSLContext:
        """TLS for aiokafka clients (the worker's, the impression log's): the CA bundle, and a
        client certificate if set."""
        context = ssl.create_default_context(cafile=self.kafka_ssl_cafile or None)
        if self.kafka_ssl_certfile:
            context.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile or None)
        return context

    def aiokafka_client_options(self) -> dict:
        """:meth:`kafka_client_options` in the form aiokafka takes (TLS as an SSLContext)."""
        options: dict = {k: v for k, v in self.kafka_client_options().items()
                         if not k.startswith("ssl_")}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.kafka_ssl_context()
        return options

    def require_services(self) -> None:
        """Raise a clear error when a role that needs Kafka and Redis lacks either."""
        missing = [name for name, value in (("STREAMREC_KAFKA_BOOTSTRAP", self.kafka_bootstrap),
                                             ("STREAMREC_REDIS_URL", self.redis_url)) if not value]
        if missing:
            raise ServicesNotSet(
                f"{', '.join(missing)} not set: point them at Kafka and Redis, "
                "or run `streamrec services` / `streamrec demo` to start embedded ones.")
