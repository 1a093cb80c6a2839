"""Erasure requests applied by the live state on a real redis-server and a real 3-primary Redis
Cluster, in every state layout; and end to end: a worker on the real broker, the SDK's
``erase_user`` and ``streamrec erase --wait``."""

import json
import subprocess
import sys
import time
import uuid

import httpx
import msgspec
import pytest

from infra.embedded import free_port
from infra.redis_client import sync_redis
from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from schemas.events import Erasure, Interaction
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from state.owner_commits import hop_settled
from state.redis_store import build_live_models
from stream.pipeline import event_chunks
from stream.producer import InteractionProducer
from stream.state import LiveState, SourceMessage
from tests.conftest import ROOT, settings_env, wait_for
from tests.state_check import applied

pytestmark = pytest.mark.integration

MODELS = "session,cooc,mf,als"
OWNED_MODELS = "session,mf,als"
TOPIC = "interactions"


def _up(url) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def events_of(user, session, items, start):
    return [Interaction(event_id=uuid.uuid4().hex, user_id=user, item_id=item,
                        type="click", timestamp=start + n, session_id=session)
            for n, item in enumerate(items)]


def names_with(client, prefix, text):
    """The keys under ``prefix`` whose names hold ``text``."""
    return sorted(name.decode() for name in client.scan_iter(match=f"{prefix}:*{text}*",
                                                             count=1000))


def values_naming(client, prefix, text) -> list[str]:
    """The keys under ``prefix`` whose value (a string's bytes, a sorted set's, set's or
    list's members, a hash's fields and values) holds ``text``; the outboxes (records to
    owners: the erasure's own removals among them) and redo records (the last commit's
    commands) aside."""
    needle, found = text.encode(), []
    for name in client.scan_iter(match=f"{prefix}:*", count=1000):
        if b":outbox:" in name or b":redo" in name:
            continue
        kind = client.type(name)
        if kind == b"string":
            parts = [client.get(name) or b""]
        elif kind == b"zset":
            parts = client.zrange(name, 0, -1)
        elif kind == b"set":
            parts = list(client.smembers(name))
        elif kind == b"list":
            parts = client.lrange(name, 0, -1)
        else:
            parts = [x for pair in client.hgetall(name).items() for x in pair]
        if any(needle in part for part in parts):
            found.append(name.decode())
    return found


def user_rows(models, keys):
    """Every user-keyed row of the models, by (model, table, key)."""
    return {(name, table, key): row for name, model in models.items()
            for table in model.user_tables
            for key, row in zip(keys, model.store.get_local_rows(table, keys))}


@pytest.mark.parametrize("layout", ["shared", "single", "owned", "single-cluster",
                                    "owned-cluster"])
def test_an_erasure_deletes_the_users_state_and_what_follows_is_learnt_afresh(
        settings, request, layout):
    writer, _, cluster = layout.partition("-")
    models = MODELS if writer != "owned" else OWNED_MODELS  # cooc claims shared rows
    s = settings.model_copy(update={"live_models": models, "state_writer": writer,
                                    "state_writer_lease_s": 2.0})
    if cluster:
        s = s.model_copy(update={"redis_url": request.getfixturevalue("redis_cluster").url})
    state = LiveState.for_worker(s)
    client, keys, prefix = state.client, RedisKeys(s.key_prefix), s.key_prefix
    items = [f"i{n}" for n in range(12)]
    t0 = time.time() - 3600
    alice = (events_of("alice", "alice-phone", items[:6], t0)
             + events_of("alice", None, items[3:9], t0 + 10))
    bob = events_of("bob", "bob-tab", items[4:10], t0 + 20)
    state.apply_messages([SourceMessage(TOPIC, 0, 0, alice), SourceMessage(TOPIC, 1, 0, bob)])
    client.set(keys.feed("alice"), b'{"user_id": "alice", "items": []}')  # as a feed builder
    client.set(keys.feed("bob"), b'{"user_id": "bob", "items": []}')
    assert client.sismember(keys.feed_queue, "alice")
    before = names_with(client, prefix, "alice")
    assert any("alice-phone" in name for name in before) and keys.feed("alice") in before
    bob_before = {name: client.dump(name) for name in names_with(client, prefix, "bob")}

    request_ = Erasure(request_id="r1", user_id="alice", timestamp=time.time(),
                       session_ids=["alice-phone"])
    later_alice = events_of("alice", "alice-new", items[9:12], t0 + 40)
    later_bob = events_of("bob", "bob-tab", items[:2], t0 + 40)
    zed = events_of("zed", None, items[:3], t0 + 30)  # another user of alice's partition
    sources = [SourceMessage(TOPIC, 0, 1, zed), SourceMessage(TOPIC, 0, 2, erasure=request_),
               SourceMessage(TOPIC, 1, 1, later_bob), SourceMessage(TOPIC, 0, 3, later_alice)]
    assert len(event_chunks(sources, max_events=100)) == 1  # nothing of alice's before it
    state.apply_messages(sources[:3])
    if writer == "owned":  # the erasure's item-delta record and zed's: one each, in order
        records = client.hgetall(keys.outbox(TOPIC, 0))
        tagged = sorted((msgspec.msgpack.decode(record)[0][f"{TOPIC}:0"],
                         sorted({op[1] for op in msgspec.msgpack.decode(record)[1]}))
                        for record in records.values())
        # (the first chunk's at 0; the erasure's below zed's, which carry the chunk's last)
        assert {tag for tag, _ in tagged} == {0, 1, 2}
        assert all(kinds == ["remove"] for tag, kinds in tagged if tag == 1)
        assert all("remove" not in kinds for tag, kinds in tagged if tag != 1)
    left = names_with(client, prefix, "alice")
    assert left == [keys.erased("alice")]  # only the marker names the user (for an hour)
    # nor is the user or the session a member of item-side rows (recent sessions, raters)
    assert values_naming(client, prefix, "alice") == []
    assert values_naming(client, prefix, "bob")  # (the scan sees ids where they are)
    assert not client.sismember(keys.feed_queue, "alice")
    state.apply_messages(sources[3:])  # alice comes back: learnt afresh

    after = names_with(client, prefix, "alice")
    assert not [name for name in after if "alice-phone" in name]
    assert keys.feed("alice") not in after
    assert [i.decode() for i in client.lrange(keys.user_history("alice"), 0, -1)] == \
        items[11:8:-1]  # only what came after the erasure, newest first
    assert int(client.hget(keys.stats, "erasures")) == 1
    assert client.get(keys.feed("bob")) is not None  # another user's feed stays

    # user-keyed state now equals models that learnt only what came after the erasure
    twins = {name: build(name).bind(MemoryStore()) for name in models.split(",")}
    for chunk in (alice + bob, later_bob + later_alice):
        for model in twins.values():
            model.learn(SignalMapper().map(chunk))
    fresh = {name: build(name).bind(MemoryStore()) for name in models.split(",")}
    for model in fresh.values():
        model.learn(SignalMapper().map(later_alice))
    readers = build_live_models(s, sync_redis(s.redis_url))
    live = user_rows(readers, ["alice", "alice-phone", "alice-new", "bob", "bob-tab"])
    expected_alice = user_rows(fresh, ["alice", "alice-phone", "alice-new"])
    expected_bob = user_rows(twins, ["bob", "bob-tab"])
    assert {k: v for k, v in live.items() if k[2].startswith("alice")} == expected_alice
    assert {k: v for k, v in live.items() if k[2].startswith("bob")} == expected_bob
    for name in ("mf", "als"):  # the vector is learnt again, from the new events
        _, found = readers[name].store.get_local_vectors("user", ["alice"],
                                                         readers[name].factors)
        assert found.all()
    # bob's keys: only what his later events changed changed
    assert set(names_with(client, prefix, "bob")) >= set(bob_before)

    # applying the erasure again (a redelivery) changes nothing
    snapshot = {name: client.dump(name) for name in names_with(client, prefix, "alice")}
    result = state.apply_messages(sources)
    assert result.redelivered_messages == 4
    assert {name: client.dump(name) for name in names_with(client, prefix, "alice")} == snapshot


def test_the_sdk_the_cli_and_the_api_erase_users_through_a_running_worker(settings, spawn):
    """In the owned layout: item-side rows (an item's recent sessions, its raters) are their
    owners', so the erasure's removals travel to them through the item-deltas topic."""
    s = settings.model_copy(update={"live_models": OWNED_MODELS, "state_writer": "owned",
                                    "api_keys": "erasure-test-key-0001"})
    client, keys, prefix = sync_redis(s.redis_url), RedisKeys(s.key_prefix), s.key_prefix
    worker = spawn(["worker", "--loglevel", "warn"], s)
    port = free_port()
    api = spawn(["api", "--port", str(port), "--loglevel", "warning"], s)
    url, key = f"http://127.0.0.1:{port}", {"X-API-Key": "erasure-test-key-0001"}
    t0 = time.time() - 600
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
        producer.send_many(events_of("carol", "carol-s", [f"i{n}" for n in range(5)], t0)
                           + events_of("dave", None, [f"i{n}" for n in range(5)], t0)
                           + events_of("erin", "erin-s", [f"i{n}" for n in range(5)], t0))
        producer.flush()
        wait_for(lambda: applied(client, s.key_prefix) >= 15, 90, "events applied",
                 proc=worker)
        assert names_with(client, prefix, "carol-s") and names_with(client, prefix, "dave")
        producer.send_many(events_of("carol", "carol-s", ["i7"], t0 + 30))  # buffered
        receipt = producer.erase_user("carol", ["carol-s"])  # sent after that event
    assert receipt.partition == int(receipt.partition) and receipt.offset >= 0
    wait_for(lambda: (int(client.get(keys.watermark(s.topic_interactions, receipt.partition))
                          or -1) >= receipt.offset), 60, "erasure applied", proc=worker)
    assert names_with(client, prefix, "carol") == [keys.erased("carol")]  # the buffered event went before the erasure
    assert names_with(client, prefix, "dave")
    wait_for(lambda: hop_settled(client, keys, s.topic_interactions, s.topic_partitions), 60,
             "owners applied the item deltas", proc=worker)
    assert values_naming(client, prefix, "carol") == []
    assert values_naming(client, prefix, "dave")  # in its items' raters and recent sessions

    env = settings_env(s)
    done = subprocess.run([sys.executable, "-m", "infra.cli", "erase", "dave", "--wait", "60"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["user_id"] == "dave" and answer["applied"] is True
    assert names_with(client, prefix, "dave") == [keys.erased("dave")]
    assert int(client.hget(keys.stats, "erasures")) == 2

    # HTTP: behind the API key; a bad body is a 422 naming the field, nothing sent
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=api)
    erase = f"{url}/v1/users/erin/erase"
    assert httpx.post(erase).status_code == 401
    bad_body = httpx.post(erase, headers=key, content=b'{"session_ids": [""]}')
    assert bad_body.status_code == 422
    assert bad_body.json()["problems"][0]["field"] == "session_ids[0]"
    assert httpx.post(erase, headers=key, content=b'{"sessions": []}').status_code == 422
    assert names_with(client, prefix, "erin-s")
    answer = httpx.post(erase, headers=key, content=b'{"session_ids": ["erin-s"]}')
    assert answer.status_code == 202, answer.text
    receipt = answer.json()
    assert receipt["user_id"] == "erin" and receipt["request_id"]
    wait_for(lambda: (int(client.get(keys.watermark(s.topic_interactions, receipt["partition"]))
                          or -1) >= receipt["offset"]), 60, "HTTP erasure applied", proc=worker)
    assert names_with(client, prefix, "erin") == [keys.erased("erin")]
    wait_for(lambda: hop_settled(client, keys, s.topic_interactions, s.topic_partitions), 60,
             "owners applied the item deltas", proc=worker)
    assert values_naming(client, prefix, "erin") == []
    assert int(client.hget(keys.stats, "erasures")) == 3

    bad = subprocess.run([sys.executable, "-m", "infra.cli", "erase", ""], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "streamrec erase: error: invalid erasure request: user_id: Expected `str` of length "
        ">= 1"]


def test_a_feed_computed_before_an_erasure_is_not_stored_after_it(settings, redis_client):
    """The feed builder pops a user, reads their state, computes, then stores: an erasure
    committed in between must not leave a feed made from the state it deleted."""
    keys = RedisKeys(settings.key_prefix)
    state = LiveState.for_worker(settings)
    items = [f"i{n}" for n in range(8)]
    state.apply_messages([SourceMessage(TOPIC, 0, 0, events_of("frank", None, items[:4],
                                                                time.time() - 60)),
                          SourceMessage(TOPIC, 1, 0, events_of("gina", None, items,
                                                                time.time() - 50))])
    builder = FeedBuilder(settings, redis_client)
    markers = builder.erasure_markers(["frank"])
    feeds = builder.compute(["frank"])
    assert feeds[0].items
    erase = Erasure(request_id="r", user_id="frank", timestamp=time.time())
    state.apply_messages([SourceMessage(TOPIC, 0, 1, erasure=erase)])
    assert builder.write(feeds, markers) == 0
    assert redis_client.get(keys.feed("frank")) is None
    # a round that starts after the erasure stores the feed (made from what is left)
    markers = builder.erasure_markers(["frank"])
    assert builder.write(builder.compute(["frank"]), markers) == 1
    assert redis_client.get(keys.feed("frank")) is not None
    assert 0 < redis_client.pttl(keys.erased("frank")) <= 3600 * 1000
