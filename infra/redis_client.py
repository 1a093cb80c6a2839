"""Redis connections built from settings."""

from __future__ import annotations

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
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


#: URL schemes of a Redis Cluster (any node as the seed): ``redis+cluster://host:port``
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def cluster_seed(url: str) -> str | None:
    """The plain URL of a Redis Cluster seed node if ``url`` names a cluster, else None."""
    for scheme in CLUSTER_SCHEMES:
        if url.startswith(scheme):
            return scheme.replace("+cluster", "") + url[len(scheme):]
    return None


def is_cluster(client) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def sync_redis(url: str) -> redis.Redis:
    """A client for ``url``: one server (``redis://``, ``rediss://``) or a Redis Cluster
    (``redis+cluster://``, ``rediss+cluster://``, any node as the seed)."""
    seed = cluster_seed(url)
    if seed is not None:
        return redis.cluster.RedisCluster.from_url(seed, **_OPTIONS)
    return redis.Redis.from_url(url, **_OPTIONS)


def async_redis(url: str, max_connections: int = 8) -> redis.asyncio.Redis:
    """An asyncio client (one per event loop) with the options of :func:`sync_redis` and at
    most ``max_connections``: more callers wait for a connection rather than open one each
    (per node on a cluster)."""
    seed = cluster_seed(url)
    if seed is not None:
        return redis.asyncio.cluster.RedisCluster.from_url(
            seed, max_connections=max_connections, **_OPTIONS)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_OPTIONS["socket_timeout"], **_OPTIONS)
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes its pool


def mget_any(client, keys: list) -> list:
    """MGET of keys in any slots: one command on one server, split by slot on a cluster."""
    if not keys:
        return []
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)


def mset_any(client, mapping: dict) -> None:
    """MSET of keys in any slots: one command on one server, one SET per key on a cluster."""
    if not mapping:
        return
    if not is_cluster(client):
        client.mset(mapping)
        return
    with client.pipeline(transaction=False) as pipe:
        for key, value in mapping.items():
            pipe.set(key, value)
        pipe.execute()
