"""Redis connections built from settings."""

from __future__ import annotations

from functools import lru_cache
from operator import itemgetter

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.crc import key_slot
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
    """MGET of keys in any slots: one command on one server, on a cluster one MGET per slot
    pipelined per node (:func:`send_per_node`)."""
    if not keys:
        return []
    if not is_cluster(client):
        return client.mget(keys)
    by_slot: dict[int, list[int]] = {}
    for n, key in enumerate(keys):
        by_slot.setdefault(slot_of(key), []).append(n)
    try:
        replies = send_per_node(client, [("MGET", *(keys[n] for n in positions))
                                         for positions in by_slot.values()], key_of=itemgetter(1))
    except (redis.exceptions.MovedError, redis.exceptions.AskError):  # slots moving
        client.nodes_manager.initialize()
        return client.mget_nonatomic(keys)  # redis-py follows the redirections
    values = [None] * len(keys)
    for positions, reply in zip(by_slot.values(), replies):
        for n, value in zip(positions, reply):
            values[n] = value
    return values


@lru_cache(maxsize=1 << 18)  # the worker names the same keys batch after batch
def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot of a key (its hash tag's, where it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def _replies(connection, count: int):
    """``count`` replies, error replies as exception objects (not raised). Straight from
    hiredis's reader where redis-py parses with it: its per-reply wrapper costs ~4 µs."""
    parser = getattr(connection, "_parser", None)
    reader = getattr(parser, "_reader", None)
    for _ in range(count):
        if reader is None:
            try:
                yield connection.read_response()
            except redis.ResponseError as exc:
                yield exc
            continue
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            parser.read_from_socket()
            reply = reader.gets()
        yield reply


def send_per_node(client: redis.cluster.RedisCluster, commands: list, key_of) -> list:
    """Send commands to a cluster as one packed write per primary (each command routed by the
    slot of ``key_of(command)``), every write before any reply is read; the replies in
    command order. Raises the first error reply once every reply is read (connections stay in
    step). redis-py's cluster pipeline does the same at ~10× the CPU per command."""
    slots, per_node = client.nodes_manager.slots_cache, {}
    for n, command in enumerate(commands):
        node = slots[slot_of(key_of(command))][0]
        per_node.setdefault(node.name, (node, []))[1].append(n)
    sent, error, replies = [], None, [None] * len(commands)
    try:
        for node, positions in per_node.values():
            pool = client.get_redis_connection(node).connection_pool
            sent.append((pool, pool.get_connection(), positions))
            sent[-1][1].send_packed_command([b"".join(
                pack_command(tuple(commands[n])) for n in positions)])
        for _, connection, positions in sent:
            for n, reply in zip(positions, _replies(connection, len(positions))):
                if isinstance(reply, redis.ConnectionError):
                    raise reply
                if isinstance(reply, redis.ResponseError):
                    error = error or reply
                replies[n] = reply
    except BaseException:
        for _, connection, _ in sent:
            connection.disconnect()  # its protocol state is unknown
        raise
    finally:
        for pool, connection, _ in sent:
            pool.release(connection)
    if error is not None:
        raise error
    return replies


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
