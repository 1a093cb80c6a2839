"""The same loop on Apache Kafka (KRaft) and Redis containers, where a Docker engine exists."""

import time

import pytest

from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for


def _docker_engine_or_skip():
    import os

    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        pytest.skip("no Docker engine (no DOCKER_HOST, no /var/run/docker.sock); the "
                    "embedded-broker tests cover this path here")
    import docker

    try:
        client = docker.from_env()
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # an engine is configured but does not answer
        pytest.skip(f"Docker engine not reachable: {exc!r}")


@pytest.mark.docker
def test_worker_on_apache_kafka_and_redis_containers(spawn, unique):
    _docker_engine_or_skip()
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    from infra.embedded import ensure_topics
    from infra.redis_client import sync_redis
    from infra.settings import Settings

    with KafkaContainer("apache/kafka:3.8.0").with_kraft() as kafka, \
            RedisContainer("redis:7.2") as redis_container:
        host, port = redis_container.get_container_host_ip(), redis_container.get_exposed_port(6379)
        s = Settings(kafka_bootstrap=kafka.get_bootstrap_server(),
                     redis_url=f"redis://{host}:{port}/0", app_id=f"sr-{unique}",
                     key_prefix=f"t{unique}", kafka_session_timeout_s=6,
                     kafka_rebalance_timeout_s=6)
        ensure_topics(s.kafka_bootstrap, {s.topic_interactions: 4, s.topic_dlq: 1})
        worker = spawn(["worker", "--loglevel", "warn"], s)
        events = list(UserSimulator(20, 50, seed=1).events(500, time.time() - 500))
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
            producer.send_many(events)
        client = sync_redis(s.redis_url)
        keys = RedisKeys(s.key_prefix)
        wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) == len(events),
                 120, "events applied", proc=worker)
        client.close()
