"""Redis connections built from settings."""

from __future__ import annotations

import redis
import redis.asyncio
from prometheus_client import Counter

#: Errors worth waiting out (server restarting, network blip, or at ``maxmemory``: a write
#: refused by OOM changed nothing, as a MULTI with a refused command is discarded whole);
#: anything else is a bug.
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                          redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                          redis.exceptions.OutOfMemoryError)


REDIS_OOM = Counter("streamrec_redis_oom_total",
                    "Writes refused because Redis reached maxmemory: the process waits and "
                    "retries, nothing is lost (alert: raise maxmemory or shorten TTLs)")


def note_redis_error(log, what: str, exc: Exception, retry_in_s: float | None = None) -> None:
    """Log a transient Redis error; Redis at ``maxmemory`` is an error an operator must act on
    (counted in ``streamrec_redis_oom_total``), the rest are warnings."""
    retry = f"; retrying in {retry_in_s:.2f}s" if retry_in_s is not None else "; retrying"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        REDIS_OOM.inc()
        log.error("redis is at maxmemory during %s (%r): writes wait, nothing is lost; raise "
                  "maxmemory or shorten TTLs (docs/redis-keys.md)%s", what, exc, retry)
    else:
        log.warning("redis unavailable during %s (%r)%s", what, exc, retry)

_OPTIONS = dict(socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30,
                decode_responses=False)


def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_OPTIONS)



def async_redis(url: str, max_connections: int = 8) -> redis.asyncio.Redis:
    """An asyncio client (one per event loop) with the options of :func:`sync_redis` and at
    most ``max_connections``: more callers wait for a connection rather than open one each."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_OPTIONS["socket_timeout"], **_OPTIONS)
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes its pool
