"""Prometheus metrics of the feed builder role (``streamrec feeds``, served on
``STREAMREC_FEEDS_METRICS_PORT``): whether stored feeds keep up with the users queued for them.
Apart from :mod:`serving.metrics` so that API processes do not export them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FEEDS_WRITTEN = Counter("streamrec_feeds_written_total",
                        "Feeds rebuilt, logged to the impressions topic and stored")
ROUND_SECONDS = Histogram("streamrec_feed_round_seconds", "A feed-builder round that found users "
                          "queued: pop them, compute their feeds, log, store",
                          buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
QUEUED_USERS = Gauge("streamrec_feed_queue_users",
                     "Users queued for a feed rebuild (read after each round)")
ROUNDS_FAILED = Counter("streamrec_feed_rounds_failed_total", "Feed-builder rounds that failed "
                        "and queued their users again, by cause (redis, impression_log)",
                        ["cause"])
