"""Redis ACL users per role (infra/redis_acl.py) on a real redis-server: each streamrec role
does its job with its own user, and nothing more; no password, no access."""

import re
import time
from pathlib import Path

import pytest
import redis

from infra.embedded import EmbeddedRedis
from infra.redis_acl import ROLES, role_rules
from infra.redis_client import MemoryByNode, memory_by_node, sync_redis
from infra.settings import Settings
from state.redis_store import build_on_redis
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from serving.neighbour_rows import NeighbourhoodPublisher
from stream.simulator import UserSimulator
from stream.state import LiveState, SourceMessage

PASSWORDS = {role: f"{role}-secret-0123456789" for role in ROLES}


@pytest.fixture
def acl_redis():
    with EmbeddedRedis(appendonly=False, passwords=PASSWORDS) as server:
        yield server


def test_each_role_does_its_job_and_nothing_more(acl_redis):
    settings = Settings(redis_url=acl_redis.role_url("worker"))  # key prefix "sr"
    keys = RedisKeys(settings.key_prefix)
    worker = sync_redis(acl_redis.role_url("worker"))
    models = build_on_redis(settings.live_model_names, worker, settings.key_prefix)
    events = list(UserSimulator(20, 60, seed=3).events(600, time.time() - 600))
    LiveState(settings, worker, list(models.values())).apply_messages(
        [SourceMessage("interactions", 0, 0, events)])
    assert int(worker.hget(keys.stats, "events_applied")) == 600
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.config_get("maxmemory")
    [(used, _limit, _evicted)] = memory_by_node(worker).values()  # INFO: for its metrics
    assert used > 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set("other-app:key", b"x")  # outside the prefix

    serving = sync_redis(acl_redis.role_url("serving"))
    assert FeedBuilder(settings, serving).refresh_round() > 0  # reads models, writes feeds
    user = events[0].user_id
    assert serving.get(keys.feed(user))
    # the feed round asked for item neighbourhoods: the feed builder publishes them
    assert NeighbourhoodPublisher.for_settings(settings, serving).publish() > 0
    assert serving.exists(keys.neighbourhood(events[0].item_id))
    model_key = next(worker.scan_iter(match="sr:m:*", count=1000))
    with pytest.raises(redis.exceptions.NoPermissionError):
        serving.delete(model_key)  # serving never writes model state
    with pytest.raises(redis.exceptions.NoPermissionError):
        serving.set(keys.watermark("interactions", 0), b"0")

    frontend = sync_redis(acl_redis.role_url("frontend"))
    assert frontend.get(keys.feed(user)) == serving.get(keys.feed(user))
    for forbidden in (lambda: frontend.set(keys.feed(user), b"{}"),
                      lambda: frontend.get(model_key),
                      lambda: frontend.lrange(keys.user_history(user), 0, -1)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()

    anonymous = sync_redis(f"redis://127.0.0.1:{acl_redis.port}/0")
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    for client in (worker, serving, frontend, anonymous):
        client.close()


def test_compose_gives_redis_the_same_role_rules():
    """docker-compose.yml cannot import Python: its redis-server users must match the rules
    here (passwords come from the environment)."""
    compose = (Path(__file__).parents[2] / "docker-compose.yml").read_text()
    assert '"--user", "default", "off"' in compose
    for role, rules in role_rules("sr").items():
        found = re.search(rf'"--user", "{role}", "on", '
                          rf'">\$\{{REDIS_{role.upper()}_PASSWORD:\?[^}}]*\}}", ([^\n]*)', compose)
        assert found, role
        tokens = re.findall(r'"([^"]*)"', found.group(1).split('"--user"')[0])
        assert tokens == rules.split(), role


def test_an_acl_user_without_info_gets_no_memory_figures_and_one_warning(redis_server,
                                                                         redis_client, caplog):
    """A deployment whose worker user predates +info: the memory metrics stay empty, the
    worker says so once, and nothing else changes."""
    import logging

    user = f"noinfo-{time.time_ns()}"
    redis_client.acl_setuser(user, enabled=True, passwords=["+noinfo-secret-0123456789"],
                             keys=["*"], commands=["+@all", "-info"])
    try:
        limited = sync_redis(f"redis://{user}:noinfo-secret-0123456789@127.0.0.1:"
                             f"{redis_server.port}/0")
        memory = MemoryByNode(logging.getLogger("test.memory"))
        with caplog.at_level(logging.WARNING, logger="test.memory"):
            assert memory(limited) == {} and memory(limited) == {}
        assert [r.getMessage()[:24] for r in caplog.records] == ["Redis refuses INFO (this"]
        [(used, _limit, _evicted)] = memory(redis_client).values()  # a user with INFO: read
        assert used > 0
        limited.close()
    finally:
        redis_client.acl_deluser(user)
