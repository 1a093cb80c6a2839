"""Prometheus metrics of the worker (served on ``STREAMREC_WORKER_METRICS_PORT``).

Names follow Prometheus conventions; one process = one target (``job="streamrec-worker"``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from infra.redis_client import REDIS_OOM  # noqa: F401 - defined where Redis errors are noted

MESSAGES_IN = Counter("streamrec_messages_in_total", "Kafka messages consumed")
EVENTS_IN = Counter("streamrec_events_in_total", "Valid events decoded from messages")
EVENTS_APPLIED = Counter("streamrec_events_applied_total", "Events applied to Redis state")
SKIPPED_DUPLICATES = Counter("streamrec_skipped_duplicate_events_total",
                             "Producer duplicates dropped (event id seen before)")
SKIPPED_REDELIVERED = Counter("streamrec_skipped_redelivered_messages_total",
                              "Messages at or below their partition's watermark")
ITEMS_IN = Counter("streamrec_item_descriptions_in_total",
                   "Valid item descriptions decoded from the items topic")
DLQ_MESSAGES = Counter("streamrec_dlq_messages_total", "Messages sent to the dead-letter topic")
ERASURE_REQUESTS = Counter("streamrec_erasure_requests_total",
                           "Erasure requests read from the interactions topic (docs/events.md)")
VECTORS_PUBLISHED = Counter("streamrec_item_vectors_published_total",
                            "Item vectors published to the item-vector topic")
BATCH_SECONDS = Histogram("streamrec_batch_seconds", "Agent batch handling time",
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
REDIS_SECONDS = Histogram("streamrec_redis_apply_seconds",
                          "Time applying one chunk to Redis (reads, maths, MULTI/EXEC)",
                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
MESSAGE_AGE = Histogram("streamrec_message_age_at_commit_seconds",
                        "From a message's Kafka timestamp (its producer's clock) to the commit of "
                        "its events' state changes: freshness as the worker sees it",
                        buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
CONSUMER_LAG = Gauge("streamrec_consumer_lag_messages", "High watermark minus last read offset",
                     ["topic", "partition"])
HELD_PARTITIONS = Gauge("streamrec_held_partitions",
                        "Partitions held back because Redis progress does not fit the Kafka log "
                        "(log went backwards, or unapplied offsets deleted): alert on > 0")
STALLED_SECONDS = Gauge("streamrec_worker_stalled_seconds",
                        "How long records have waited unapplied with no batch arriving (the "
                        "worker exits for a restart at STREAMREC_WORKER_STALL_TIMEOUT_S)")
REDIS_USED_MEMORY = Gauge("streamrec_redis_used_memory_bytes",
                          "Memory Redis uses, per node (INFO, read every "
                          "STREAMREC_WORKER_REPORT_INTERVAL_S)", ["node"])
REDIS_MAXMEMORY = Gauge("streamrec_redis_maxmemory_bytes",
                        "Redis's maxmemory, per node (0: no limit)", ["node"])
REDIS_EVICTED_KEYS = Gauge("streamrec_redis_evicted_keys",
                           "Keys Redis evicted at maxmemory since it started, per node (its "
                           "own counter: back to 0 when Redis restarts)", ["node"])
HELD_MESSAGES = Counter("streamrec_held_messages_total",
                        "Messages of held partitions consumed and not applied (read again "
                        "once an operator chooses where the partition resumes)")
REVOCATION_WRITES_SECONDS = Histogram(
    "streamrec_revocation_writes_seconds",
    "At each rebalance, the wait for this worker's computed writes (source chunks, item "
    "owners) to be in Redis before it gives its partitions up",
    buckets=(.001, .005, .025, .1, .25, 1, 2.5, 5, 10))
CHUNKS_REDONE = Gauge("streamrec_chunks_redone",
                      "Chunks applied again since start because their commit was voided or "
                      "failed (a rebalance, a lost lease, a Redis error): each drops the "
                      "cached state; a steady rise needs a look")
ITEM_DELTAS_RELAYED = Counter("streamrec_item_delta_records_relayed_total",
                              "Owned layout: item-delta records sent from the outboxes to the "
                              "item-deltas topic")
ITEM_DELTAS_HANDED = Counter("streamrec_item_delta_records_handed_locally_total",
                             "Owned layout: item-delta records applied straight from the "
                             "outboxes by this worker's own owner partitions (no Kafka hop)")
ITEM_DELTA_HANDOFFS = Counter("streamrec_item_delta_handoffs_total",
                              "Owned layout: local hand-offs (each owner applies and commits "
                              "once per hand-off; at most one per "
                              "STREAMREC_OWNED_HANDOFF_INTERVAL_S)")
ITEM_DELTA_OPERATIONS = Counter("streamrec_item_delta_operations_applied_total",
                                "Owned layout: operations of item-delta records applied by this "
                                "worker's owner partitions (re-sent records not counted)")
