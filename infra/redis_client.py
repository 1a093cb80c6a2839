"""Redis connections built from settings."""

from __future__ import annotations

import redis

#: Errors worth waiting out (server restarting, network blip); anything else is a bug.
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                          redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)

_OPTIONS = dict(socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30,
                decode_responses=False)


def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_OPTIONS)

