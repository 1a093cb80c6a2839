"""Redis connections built from settings."""

from __future__ import annotations

import logging
from functools import lru_cache
from operator import itemgetter
from typing import Callable, Iterator, NamedTuple

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.crc import key_slot
from prometheus_client import Counter

from infra.logs import Every

_log = logging.getLogger(__name__)

#: Errors worth waiting out (server restarting, network blip, or at ``maxmemory``: a write
#: refused by OOM changed nothing, as a MULTI with a refused command is discarded whole);
#: anything else is a bug.
TRANSIENT_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                          redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                          redis.exceptions.OutOfMemoryError)


REDIS_OOM = Counter("streamrec_redis_oom_total",
                    "Writes refused because Redis reached maxmemory: the process waits and "
                    "retries, nothing is lost (alert: raise maxmemory or shorten TTLs)")
REDIS_UNAVAILABLE = Counter("streamrec_redis_unavailable_total",
                            "Redis calls failed for a passing reason other than maxmemory "
                            "(connection refused or lost, timeout, loading, cluster down): the "
                            "process waits and retries")


class MemoryByNode:
    """Each Redis node's (used_memory, maxmemory, evicted_keys) from INFO: one node for a
    plain client, every node of a cluster (keyed by host:port). maxmemory 0 = no limit. An ACL
    user without INFO gets {} and one warning (on ``log``), not an error each call."""

    def __init__(self, log) -> None:
        self.log, self.refused = log, False

    def __call__(self, client) -> dict[str, tuple[int, int, int]]:
        try:
            return memory_by_node(client)
        except redis.exceptions.NoPermissionError as exc:
            if not self.refused:
                self.log.warning("Redis refuses INFO (%s): no Redis memory metrics until this "
                                 "ACL user has +info (infra/redis_acl.py)", exc)
            self.refused = True
            return {}


def memory_by_node(client) -> dict[str, tuple[int, int, int]]:
    """See :class:`MemoryByNode`."""
    if isinstance(client, redis.cluster.RedisCluster):
        answer = client.info(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        kwargs = client.connection_pool.connection_kwargs
        node = kwargs.get("path") or f"{kwargs.get('host', '')}:{kwargs.get('port', '')}"
        answer = {node: client.info()}
    return {node: (int(info["used_memory"]), int(info["maxmemory"]), int(info["evicted_keys"]))
            for node, info in answer.items()}


REPLICA_WAITS = Counter(
    "streamrec_redis_replica_waits_total",
    "WAITs that ended with fewer replicas acknowledging a commit than "
    "STREAMREC_REDIS_WAIT_REPLICAS asks (each STREAMREC_REDIS_WAIT_TIMEOUT_MS): the commit "
    "waits on and nothing newer is applied (alert: a replica is down or far behind)")


class ReplicaWait(NamedTuple):
    """Writes are done once ``replicas`` replicas of the primary written acknowledged them
    (Redis ``WAIT``), each wait lasting ``timeout_ms`` before a warning and another."""

    replicas: int
    timeout_ms: int

    @property
    def command(self) -> tuple:
        return ("WAIT", self.replicas, self.timeout_ms)

    def until_acknowledged(self, connection, acknowledged: int) -> None:
        """Send ``WAIT`` on ``connection`` again until ``replicas`` replicas acknowledged its
        writes (its last ``WAIT`` answered ``acknowledged``). WAIT covers the connection's
        last write and, Redis's replication stream being ordered, every earlier write to that
        primary by any connection."""
        while acknowledged < self.replicas:
            REPLICA_WAITS.inc()
            _log.warning("%d of %d replicas of %s acknowledged a commit within %d ms "
                         "(STREAMREC_REDIS_WAIT_REPLICAS): waiting on (a replica down or "
                         "behind?)", acknowledged, self.replicas,
                         f"{connection.host}:{connection.port}", self.timeout_ms)
            connection.send_command(*self.command)
            acknowledged = connection.read_response()


def replica_wait(settings) -> ReplicaWait | None:
    """What ``settings`` (an :class:`infra.settings.Settings`) ask commits to wait for
    (``STREAMREC_REDIS_WAIT_REPLICAS``); None: no wait."""
    if not settings.redis_wait_replicas:
        return None
    return ReplicaWait(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)


def retry_delays(retry_max_s: float, first_s: float = 0.05) -> Iterator[float]:
    """The pauses between tries after transient Redis errors: ``first_s``, doubling, at most
    ``retry_max_s``, for ever."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, retry_max_s)


def note_redis_error(log, what: str, exc: Exception, retry_in_s: float | None = None) -> None:
    """Log a transient Redis error; Redis at ``maxmemory`` is an error an operator must act on
    (counted in ``streamrec_redis_oom_total``), the rest are warnings (counted in
    ``streamrec_redis_unavailable_total``)."""
    retry = f"; retrying in {retry_in_s:.2f}s" if retry_in_s is not None else "; retrying"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        REDIS_OOM.inc()
        log.error("redis is at maxmemory during %s (%r): writes wait, nothing is lost; raise "
                  "maxmemory or shorten TTLs (docs/redis-keys.md)%s", what, exc, retry)
    else:
        REDIS_UNAVAILABLE.inc()
        log.warning("redis unavailable during %s (%r)%s", what, exc, retry)


class SkippedWrites:
    """Around a write serving may skip while Redis is at ``maxmemory`` (its reads go on):
    ``with skipped: ...`` swallows the refusal, counts it in ``streamrec_redis_oom_total``
    and logs it at most once a minute."""

    def __init__(self, log, what: str) -> None:
        self.log, self.what = log, what
        self._logging = Every(60)

    def __enter__(self) -> "SkippedWrites":
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if not isinstance(exc, redis.exceptions.OutOfMemoryError):
            return False
        if self._logging.due():
            note_redis_error(self.log, self.what, exc)  # counts it too
        else:
            REDIS_OOM.inc()
        return True


_OPTIONS = dict(socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30,
                decode_responses=False)


#: URL schemes of a Redis Cluster: ``redis+cluster://host:port`` (any node as the seed) or
#: several seeds, ``redis+cluster://[user:password@]host1:port1,host2:port2,...``
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def _cluster_url_parts(url: str) -> tuple[str, str, list[str], str] | None:
    """A Redis Cluster URL split into its plain scheme (``redis://``), its ``user:password@``
    (or ""), its seeds (``host:port`` each) and the rest (path, query); None if ``url`` does
    not name a cluster."""
    for scheme in CLUSTER_SCHEMES:
        if url.startswith(scheme):
            rest = url[len(scheme):]
            netloc_end = min((rest.find(c) for c in "/?#" if c in rest), default=len(rest))
            user, at, hosts = rest[:netloc_end].rpartition("@")
            return (scheme.replace("+cluster", ""), user + at, hosts.split(","),
                    rest[netloc_end:])
    return None


def cluster_seed(url: str) -> str | None:
    """The plain URL of a Redis Cluster's first seed node if ``url`` names a cluster (its
    other seeds: :func:`cluster_seeds`), else None."""
    parts = _cluster_url_parts(url)
    if parts is None:
        return None
    scheme, user, seeds, rest = parts
    return scheme + user + seeds[0] + rest


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """Every seed node (host, port) a Redis Cluster URL names: where the first is down (a
    failed primary, say), a process starting or reconnecting asks the next."""
    parts = _cluster_url_parts(url)
    if parts is None:
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    found = []
    for seed in parts[2]:
        host, colon, port = seed.rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise ValueError(f"a Redis Cluster seed must be host:port, got {seed!r}")
        found.append((host.strip("[]"), int(port)))
    return found


def is_cluster(client) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


#: redis-py's errors building a cluster's client that pass once the cluster is up: no seed
#: answered, or the cluster is being created (its slots not yet assigned)
_CLUSTER_NOT_UP = ("cannot be connected", "slots are not covered")


def sync_redis(url: str) -> redis.Redis:
    """A client for ``url``: one server (``redis://``, ``rediss://``) or a Redis Cluster
    (``redis+cluster://``, ``rediss+cluster://``, any node as the seed, or several:
    :data:`CLUSTER_SCHEMES`). A cluster's client reads the slot map at once: where no seed
    answers, or the slots are not all assigned yet, that is a ``redis.ConnectionError``
    (transient, as any unreachable Redis)."""
    seed = cluster_seed(url)
    if seed is not None:
        try:
            return redis.cluster.RedisCluster.from_url(seed, startup_nodes=[
                redis.cluster.ClusterNode(*node) for node in cluster_seeds(url)[1:]],
                **_OPTIONS)
        except redis.exceptions.RedisClusterException as exc:
            if not any(transient in str(exc) for transient in _CLUSTER_NOT_UP):
                raise  # a misconfiguration (cluster mode off on the node, say)
            raise redis.ConnectionError(str(exc)) from exc
    return redis.Redis.from_url(url, **_OPTIONS)


def async_redis(url: str, max_connections: int = 8) -> redis.asyncio.Redis:
    """An asyncio client (one per event loop) with the options of :func:`sync_redis` and at
    most ``max_connections``: more callers wait for a connection rather than open one each
    (per node on a cluster)."""
    seed = cluster_seed(url)
    if seed is not None:
        return redis.asyncio.cluster.RedisCluster.from_url(
            seed, startup_nodes=[redis.asyncio.cluster.ClusterNode(*node)
                                 for node in cluster_seeds(url)[1:]],
            max_connections=max_connections, **_OPTIONS)
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
    groups = by_slot(keys)
    replies = send_per_node(client, [("MGET", *group) for group in groups], itemgetter(1))
    found = {key: value for group, reply in zip(groups, replies)
             for key, value in zip(group, reply)}
    return [found[key] for key in keys]


async def mget_any_async(client, keys: list) -> list:
    """:func:`mget_any` on an asyncio client (redis-py's own split by slot on a cluster)."""
    return await (client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys))


def by_slot(keys) -> list[list]:
    """Keys grouped by Redis Cluster slot (one multi-key command per group)."""
    groups: dict[int, list] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return list(groups.values())


@lru_cache(maxsize=1 << 18)  # the worker names the same keys batch after batch
def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot of a key (its hash tag's, where it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def _replies(connection, count: int):
    """``count`` replies, error replies as exception objects (not raised). Straight from
    hiredis's reader where redis-py parses with it: its per-reply wrapper costs ~4 µs. A
    socket error (a node killed mid-reply) is raised as redis's ConnectionError, as redis-py's
    own read raises it, so callers treat it as the transient error it is."""
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
            try:
                parser.read_from_socket()
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
            reply = reader.gets()
        yield reply


def send_per_node(client: redis.cluster.RedisCluster, commands: list[tuple], key_of,
                  before_send: Callable[[], None] | None = None,
                  wait: ReplicaWait | None = None) -> list:
    """Send commands (tuples) to a cluster as one packed write per primary, each routed by the
    slot of ``key_of(command)``, every write before any reply is read; the replies in command
    order. ``before_send`` is called once everything is packed, just before the first byte
    goes out (and again before a resend): it may raise to send nothing. Raises the first
    error reply once every reply is read (connections stay in step). redis-py's cluster
    pipeline does the same at ~10× the CPU per command; where slots moved (MOVED, ASK) the
    commands go through it again, as it follows redirections, so callers only send commands
    that may be applied twice. Where a node cannot be reached (it died, and
    a replica may be taking over its slots), the slot map is read again before the error is
    raised, so the caller's retry goes to whichever node holds the slots then. ``wait``:
    each node's writes are followed by ``WAIT`` on their connection, and the call returns
    once each was acknowledged (:meth:`ReplicaWait.until_acknowledged`); after a redirection,
    the commands are sent again that way once the slot map is read anew."""
    try:
        return _send_packed(client, commands, key_of, before_send, wait)
    except (redis.exceptions.MovedError, redis.exceptions.AskError):
        client.nodes_manager.initialize()
        with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            if before_send is not None:
                before_send()
            replies = pipe.execute()
        if wait is not None:  # WAIT on the connections that write: the commands again
            try:
                _send_packed(client, commands, key_of, None, wait)
            except (redis.exceptions.MovedError, redis.exceptions.AskError) as exc:
                raise redis.exceptions.TryAgainError(  # transient: the caller retries
                    f"slots still moving while waiting for replicas ({exc})") from exc
        return replies
    except (redis.ConnectionError, redis.TimeoutError):
        refresh_slots(client)
        raise


def send_and_wait(client: redis.Redis, commands: list[tuple], wait: ReplicaWait,
                  before_send: Callable[[], None] | None = None) -> list:
    """:func:`send_per_node` with ``wait`` for one server: the commands and ``WAIT`` in one
    packed write on one connection (redis-py's pipeline gives its connection back before a
    second WAIT could follow); the replies in order, the first error reply raised once every
    reply is read."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        if before_send is not None:
            before_send()
        connection.send_packed_command([b"".join(pack(command)
                                                 for command in (*commands, wait.command))])
        replies = list(_replies(connection, len(commands) + 1))
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if not errors:
            wait.until_acknowledged(connection, replies.pop())
    except BaseException:
        connection.disconnect()  # its protocol state is unknown
        raise
    finally:
        pool.release(connection)
    if errors:
        raise errors[0]
    return replies


def refresh_slots(client: redis.cluster.RedisCluster) -> None:
    """Read the cluster's slot map again from any reachable node (after a failover); where
    none answers, the map stays as it was."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, OSError):
        pass


def pack(command: tuple) -> bytes:
    """One command in the Redis protocol, as ``hiredis.pack_command`` packs it. Commands of
    many large byte strings (rows and vectors written whole) are joined here instead: hiredis
    copies large arguments slowly (measured: 70 ms against 12 ms for 5,000 rows of 3.5 KB)."""
    if len(command) < 64 or not isinstance(command[-1], bytes):
        return pack_command(command)
    if command[0] == "MSET":
        try:
            return _pack_mset(command)
        except (AttributeError, TypeError):  # not all names str and values bytes
            pass
    parts = [b"*%d\r\n" % len(command)]
    append = parts.append
    for arg in command:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, float):
            arg = float.__repr__(arg).encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def _pack_mset(command: tuple) -> bytes:
    """:func:`pack` of ``MSET`` with str names and bytes values: a third less CPU than the
    general path (one format per pair, values joined without a copy)."""
    parts = [b"*%d\r\n$4\r\nMSET\r\n" % len(command)]
    extend = parts.extend
    pairs = iter(command)
    next(pairs)
    for name, value in zip(pairs, pairs):
        name = name.encode()
        extend((b"$%d\r\n%b\r\n$%d\r\n" % (len(name), name, len(value)), value, b"\r\n"))
    return b"".join(parts)


def _send_packed(client, commands: list[tuple], key_of, before_send=None,
                 wait: ReplicaWait | None = None) -> list:
    slots, per_node = client.nodes_manager.slots_cache, {}
    for n, command in enumerate(commands):
        node = slots[slot_of(key_of(command))][0]
        per_node.setdefault(node.name, (node, []))[1].append(n)
    tail = [pack(wait.command)] if wait is not None else []
    packed = [b"".join([*(pack(commands[n]) for n in positions), *tail])
              for _, positions in per_node.values()]
    sent, error, replies = [], None, [None] * len(commands)
    try:
        for node, positions in per_node.values():
            pool = client.get_redis_connection(node).connection_pool
            sent.append((pool, pool.get_connection(), positions))
        if before_send is not None:
            before_send()
        for (_, connection, _), data in zip(sent, packed):
            connection.send_packed_command([data])
        for _, connection, positions in sent:
            read = _replies(connection, len(positions) + len(tail))
            for n, reply in zip(positions, read):
                if isinstance(reply, redis.ConnectionError):
                    raise reply
                if isinstance(reply, redis.ResponseError):
                    error = error or reply
                replies[n] = reply
            if wait is not None:
                acknowledged = next(read)
                if isinstance(acknowledged, Exception):
                    raise acknowledged
                if error is None:
                    wait.until_acknowledged(connection, acknowledged)
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
    if is_cluster(client):
        send_per_node(client, [("SET", key, value) for key, value in mapping.items()],
                      itemgetter(1))
    else:
        client.mset(mapping)
