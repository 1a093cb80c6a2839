"""Redis connections built from settings."""

from __future__ import annotations

import redis
import redis.asyncio

#: Errors worth waiting out (server restarting, network blip); anything else is a bug.
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                          redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)

_OPTIONS = dict(socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30,
                decode_responses=False)


def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_OPTIONS)



def async_redis(url: str, max_connections: int = 8) -> redis.asyncio.Redis:
    """An asyncio client (one per event loop) with the options of :func:`sync_redis` and at
    most ``max_connections``: more callers wait for a connection rather than open one each."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_OPTIONS["socket_timeout"], **_OPTIONS)
    return redis.asyncio.Redis(connection_pool=pool)
