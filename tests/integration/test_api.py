"""HTTP API contract against real Redis and the real broker (uvicorn in a subprocess)."""

import time

import httpx
import msgspec
import orjson
import pytest

from infra.embedded import free_port
from schemas.events import decode_message
from schemas.impressions import decode as decode_impression
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from stream.simulator import UserSimulator
from stream.state import LiveState
from stream.worker_report import LiveFigures, publish_report
from schemas.events import Interaction
from tests.conftest import metric, wait_for
from tests.integration.kafka_helpers import read_topic

GOOD = {"event_id": "e1", "user_id": "api-user", "item_id": "i1", "type": "click",
        "timestamp": 1_700_000_000.0}


@pytest.fixture
def api(settings, spawn):
    port = free_port()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning"], settings)
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "API up", proc=proc)
    return url


def test_post_valid_events_reach_kafka(api, settings):
    envelope = {"events": [GOOD, {**GOOD, "event_id": "e2", "item_id": "i2"}]}
    response = httpx.post(f"{api}/v1/events", content=orjson.dumps(envelope))
    assert response.status_code == 202 and response.json() == {"accepted": 2}
    assert httpx.post(f"{api}/v1/events", content=orjson.dumps(GOOD)).json() == {"accepted": 1}
    records = read_topic(settings.kafka_bootstrap, settings.topic_interactions, 2)
    got = [e.event_id for r in records for e in decode_message(r.value)]
    assert sorted(got) == ["e1", "e1", "e2"]


def test_post_invalid_events_is_422_naming_fields_and_sends_nothing(api, settings):
    bad = {"events": [GOOD, {**GOOD, "user_id": 7}]}
    response = httpx.post(f"{api}/v1/events", content=orjson.dumps(bad))
    assert response.status_code == 422
    body = response.json()
    assert body["problems"] == [{"index": 1, "field": "events[1].user_id",
                                 "reason": "Expected `str`, got `int`"}]
    assert httpx.post(f"{api}/v1/events", content=b"\x00garbage").status_code == 422
    assert read_topic(settings.kafka_bootstrap, settings.topic_interactions, 1, timeout_s=3) == []


def test_post_poison_bodies_get_4xx_and_the_api_keeps_serving(api, settings):
    nested = httpx.post(f"{api}/v1/events", content=b"[" * 5000 + b"]" * 5000)
    assert nested.status_code == 422 and "nested deeper" in nested.text
    too_big = b'{"event_id": "' + b"x" * (settings.max_message_bytes + 10) + b'"}'
    assert httpx.post(f"{api}/v1/events", content=too_big).status_code == 413

    def chunks():  # no Content-Length: refused while streaming, not after buffering it all
        for _ in range(64):
            yield b"x" * 65_536

    refused = httpx.post(f"{api}/v1/events", content=chunks())
    assert refused.status_code == 413 and "exceeds" in refused.json()["detail"]
    many = {"events": [{**GOOD, "event_id": f"e{n}", "user_id": 7} for n in range(1000)]}
    body = httpx.post(f"{api}/v1/events", content=orjson.dumps(many)).json()
    assert len(body["problems"]) == 50 and body["problems_omitted"] == 950
    for path in (f"/v1/users/{'u' * 257}/feed", "/v1/users//feed",
                 f"/v1/users/{'u' * 60_000}/recommendations", f"/v1/items/{'i' * 257}/similar",
                 f"/v1/users/u1/recommendations?exclude={'x' * 257}",
                 f"/v1/users/u1/recommendations?pin=0:{'x' * 257}"):
        assert 400 <= httpx.get(f"{api}{path}").status_code < 500, path[:40]
    assert httpx.get(f"{api}/healthz").status_code == 200
    assert read_topic(settings.kafka_bootstrap, settings.topic_interactions, 1, timeout_s=3) == []


def test_item_descriptions_in_keyed_by_item_and_read_back(api, settings, redis_client):
    item = {"item_id": "m/1", "timestamp": 1_700_000_000.0, "categories": ["Comedy"],
            "tags": ["pixar"], "title": "Toy Story"}
    bad = httpx.post(f"{api}/v1/items", content=orjson.dumps(
        {"items": [item, {**item, "categories": [""]}]}))
    assert bad.status_code == 422
    assert bad.json()["problems"][0]["field"] == "items[1].categories[0]"
    sent = httpx.post(f"{api}/v1/items", content=orjson.dumps({"items": [item]}))
    assert sent.status_code == 202 and sent.json() == {"accepted": 1}
    [record] = read_topic(settings.kafka_bootstrap, settings.topic_items, 1)
    assert record.key == b"m/1" and orjson.loads(record.value)["tags"] == ["pixar"]
    assert httpx.get(f"{api}/v1/items/m%2F1").status_code == 404  # no worker stored it yet
    redis_client.set(RedisKeys(settings.key_prefix).item_description("m/1"), record.value)
    assert httpx.get(f"{api}/v1/items/m%2F1").json()["title"] == "Toy Story"


def test_feed_read_stored_and_on_demand(api, settings, redis_client):
    events = list(UserSimulator(10, 60, seed=4).events(400, time.time() - 400))
    LiveState(settings, redis_client).apply_sync(events)
    FeedBuilder(settings, redis_client).refresh_round()
    user = events[0].user_id
    stored = msgspec.json.decode(redis_client.get(RedisKeys(settings.key_prefix).feed(user)))
    assert httpx.get(f"{api}/v1/users/{user}/feed").json() == stored
    fresh = httpx.get(f"{api}/v1/users/{user}/feed", params={"k": 3}).json()
    assert fresh["source"] == "on_demand" and len(fresh["items"]) == 3
    newcomer = httpx.get(f"{api}/v1/users/who:is/this{{}}/feed").json()  # never seen: trending
    assert newcomer["user_id"] == "who:is/this{}" and len(newcomer["items"]) == settings.feed_size
    trending = httpx.get(f"{api}/v1/trending", params={"k": 5}).json()
    for got, want in zip(newcomer["items"][:5], trending):  # a cold-start user gets trending
        assert got["item_id"] == want["item_id"] or got["reason"] == "exploring"
    assert httpx.get(f"{api}/v1/trending", params={"k": 0}).status_code == 422


def test_explorer_reads_users_histories_descriptions_and_live_figures(api, settings,
                                                                       redis_client):
    keys = RedisKeys(settings.key_prefix)
    events = list(UserSimulator(12, 60, seed=6).events(300, time.time() - 300))
    odd = Interaction(event_id="odd", user_id="ali:{ce}/1", item_id="i1", type="click",
                      timestamp=time.time())
    LiveState(settings, redis_client).apply_sync([*events, odd])
    users = httpx.get(f"{api}/v1/users", params={"limit": 100}).json()["users"]
    assert users == sorted({e.user_id for e in events} | {odd.user_id})
    assert httpx.get(f"{api}/v1/users", params={"prefix": "ali:{"}).json()["users"] == \
        ["ali:{ce}/1"]  # ids are matched decoded, whatever they hold
    assert len(httpx.get(f"{api}/v1/users", params={"limit": 3}).json()["users"]) == 3
    user = events[-1].user_id
    mine = [e.item_id for e in events if e.user_id == user]
    history = httpx.get(f"{api}/v1/users/{user}/history").json()
    assert history == {"user_id": user, "items": mine[::-1][:settings.history_len]}
    redis_client.set(keys.item_description("i1"), orjson.dumps({"item_id": "i1",
                                                                 "title": "One"}))
    described = httpx.get(f"{api}/v1/items", params={"id": ["i1", "nope"]}).json()["items"]
    assert described == {"i1": {"item_id": "i1", "title": "One"}, "nope": None}
    assert httpx.get(f"{api}/v1/items", params={"id": ["x"] * 201}).status_code == 422
    assert httpx.get(f"{api}/v1/items").status_code == 422

    now = time.time()
    figures = LiveFigures()
    figures.record(now - 1, [0.010, 0.020, 0.030, 2.0], 40)
    publish_report(redis_client, keys, "host:1", figures.snapshot(now), now)
    publish_report(redis_client, keys, "gone:2", {"events_per_s": 5.0}, now - 2 * 3600)
    stats = httpx.get(f"{api}/v1/stats").json()
    assert stats["events_applied"] == len(events) + 1 and stats["dlq_messages"] == 0
    assert [w["worker"] for w in stats["workers"]] == ["host:1"]  # the stale one is not live
    assert stats["events_per_s"] == 4.0 and stats["freshness_p50_ms"] == 25.0
    assert stats["freshness_p99_ms"] > 1900
    assert stats["consumer_lag"] == 0 and set(stats["lag_by_partition"]) == {"0", "1", "2", "3"}
    publish_report(redis_client, keys, "host:1", figures.snapshot(now), now)
    assert set(redis_client.hkeys(keys.worker_reports)) == {b"host:1"}  # gone:2 deleted


def test_explorer_page_and_docs_are_served_without_a_cdn(api):
    root = httpx.get(f"{api}/")
    assert root.status_code == 307 and root.headers["location"] == "/explorer/"
    page = httpx.get(f"{api}/explorer/")
    assert page.status_code == 200 and "feed explorer" in page.text
    for asset in ("explorer.js", "explorer.css"):
        assert httpx.get(f"{api}/explorer/{asset}").status_code == 200
    docs = httpx.get(f"{api}/docs").text
    assert "cdn." not in docs and "/static-offline-docs/swagger-ui-bundle.js" in docs
    assert httpx.get(f"{api}/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_health_readiness_and_openapi(api):
    assert httpx.get(f"{api}/readyz").json()["status"] == "ready"
    spec = httpx.get(f"{api}/openapi.json").json()
    assert {"/v1/events", "/v1/trending", "/healthz", "/readyz"} <= set(spec["paths"])
    def body(path: str) -> dict:
        request_body = spec["paths"][path]["post"]["requestBody"]
        return request_body["required"], request_body["content"]["application/json"]["schema"]

    required, events = body("/v1/events")  # events only: erasures have their own route
    assert required and {"Interaction", "Envelope"} == set(events["$defs"])
    required, items = body("/v1/items")
    assert required and "ItemRecord" in items["$defs"]
    required, erasure = body("/v1/users/{user_id}/erase")
    assert not required and set(erasure["properties"]) == {"session_ids", "request_id"}
    assert erasure["additionalProperties"] is False


def test_what_the_api_built_before_serving_is_kept_out_of_full_collections(settings):
    """gc.freeze at start: a full collection then skips imports, models and the index (its
    pauses had been the on-demand lists' slowest passes)."""
    import gc

    from starlette.testclient import TestClient

    from serving.api import create_app

    gc.unfreeze()
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_the_api_loads_its_compiled_loops_before_the_first_list(settings):
    """Without it the first on-demand list of each API process waited for numba: 0.27 s with
    its cache on disk, 3 s without (a read-only install)."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import settings_env

    loaded = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from starlette.testclient import TestClient
        from online_models import kernels
        from serving.api import create_app
        from serving.rerank import mmr_order
        loops = (mmr_order, kernels.weighted_row_sums, kernels.session_knn_scores)
        before = [len(loop.signatures) for loop in loops]
        with TestClient(create_app()):
            print(before, [len(loop.signatures) for loop in loops])
    """)], env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("\n")[-2] == "[0, 0, 0] [1, 1, 1]"


def test_recommendations_are_logged_with_propensities_and_respect_exclusions(api, settings,
                                                                             redis_client):
    from schemas import impressions

    events = list(UserSimulator(10, 60, seed=5).events(400, time.time() - 400))
    LiveState(settings, redis_client).apply_sync(events)
    user = events[0].user_id
    mine = [e.item_id for e in events if e.user_id == user and e.type != "impression"]
    seen = set(mine[-settings.history_len:])  # the seen-filter covers the kept history
    response = httpx.get(f"{api}/v1/users/{user}/recommendations",
                         params=[("k", 8), ("exclude", "i1"), ("exclude", "i2")])
    assert response.status_code == 200
    body = response.json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert not set(ids) & ({"i1", "i2"} | seen)
    assert [i["position"] for i in body["items"]] == list(range(8))
    assert body["policy"] == "epsilon-greedy"
    for item in body["items"]:  # reserved positions 3 and 7 carry ε-greedy propensities
        assert item["propensity"] == 1.0 if item["position"] not in (3, 7) else \
            0 < item["propensity"] < 1
    [record] = read_topic(settings.kafka_bootstrap, settings.topic_impressions, 1)
    logged = impressions.decode(record.value)
    assert logged.recommendation_id == body["recommendation_id"]
    assert [(i.item_id, i.position, i.propensity) for i in logged.items] == [
        (i["item_id"], i["position"], i["propensity"]) for i in body["items"]]
    assert record.key.decode() == user
    pinned = httpx.get(f"{api}/v1/users/{user}/recommendations",
                       params=[("k", 5), ("pin", "0:editorial-pick"), ("pin", "2:i1")]).json()
    assert pinned["items"][0]["item_id"] == "editorial-pick"
    assert pinned["items"][2]["item_id"] == "i1" and pinned["items"][2]["reason"] == "pinned"
    assert httpx.get(f"{api}/v1/users/{user}/recommendations",
                     params={"pin": "first:x"}).status_code == 422


def test_impression_records_land_on_their_users_partitions_in_order(settings):
    """Records go out in one batch per partition: each on the partition Kafka's default
    partitioner gives its key (kafka-python's murmur2 here, an implementation of its own), a
    user's records in the order logged."""
    from kafka.partitioner.default import murmur2

    from schemas import impressions
    from serving.feeds import ImpressionLogger

    logger = ImpressionLogger(settings)
    try:
        records = [(f"user-{n % 13}", impressions.ImpressionLog(
            f"r{n}", f"user-{n % 13}", "none", "v", 1.7e9 + n,
            [impressions.LoggedItem(f"i{n}", 0, 1.0, 1.0, "trending")])) for n in range(60)]
        logger.log(records[:35])
        logger.log(records[35:])
    finally:
        logger.close()
    got = read_topic(settings.kafka_bootstrap, settings.topic_impressions, 60)
    assert sorted(decode_impression(r.value).recommendation_id for r in got) == sorted(
        f"r{n}" for n in range(60))
    for r in got:  # Kafka's default placement of a keyed record
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % settings.topic_partitions
        assert decode_impression(r.value).user_id == r.key.decode()
    for user in {u for u, _ in records}:
        in_log = [decode_impression(r.value).recommendation_id
                  for r in sorted(got, key=lambda r: r.offset) if r.key.decode() == user]
        assert in_log == [rec.recommendation_id for u, rec in records if u == user]


@pytest.mark.parametrize("live_models, neighbours_from", [
    ("session,mf", "session"),  # the default: co-occurrence scored at read time
    ("session,cooc,mf", "cooc"),  # pairs counted per event
])
def test_similar_items_and_unknown_ids(live_models, neighbours_from, settings, spawn,
                                       redis_client):
    from online_models.registry import build
    from online_models.signals import SignalMapper
    from state.redis_store import RedisStore

    events = list(UserSimulator(20, 40, seed=6).events(800, time.time() - 800))
    model = build(neighbours_from).bind(
        RedisStore(redis_client, settings.key_prefix, neighbours_from))
    model.learn(SignalMapper().map(events))
    port = free_port()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning"],
                 settings.model_copy(update={"live_models": live_models}))
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=proc)
    item = events[0].item_id
    body = httpx.get(f"{url}/v1/items/{item}/similar", params={"k": 5}).json()
    expected = sorted(model.similar([item])[0].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert len(expected) == 5 and [i["item_id"] for i in body["items"]] == [i for i, _ in expected]
    assert all(i["reason"] == f"viewed together with {item}" for i in body["items"])
    assert httpx.get(f"{url}/v1/items/nobody-knows/similar").json()["items"] == []


def test_api_keys_guard_v1_routes_but_not_health(settings, spawn, redis_client):
    events = list(UserSimulator(5, 30, seed=9).events(100, time.time() - 100))
    LiveState(settings, redis_client).apply_sync(events)
    FeedBuilder(settings, redis_client).refresh_round()
    feed = f"/v1/users/{events[0].user_id}/feed"  # stored: the fast path's request
    port = free_port()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning"],
                 settings.model_copy(update={"api_keys": "front-end-key-0001,worker-key-00002"}))
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=proc)
    assert httpx.get(f"{url}/v1/trending").status_code == 401
    assert httpx.get(f"{url}/v1/trending", headers={"X-API-Key": "nope"}).status_code == 401
    assert httpx.get(f"{url}/v1/trending",
                     headers={"X-API-Key": "worker-key-00002"}).status_code == 200
    assert httpx.post(f"{url}/v1/events", content=orjson.dumps(GOOD)).status_code == 401
    assert httpx.get(f"{url}{feed}").status_code == 401
    assert httpx.get(f"{url}{feed}", headers={"X-API-Key": "front-end-key-000"}).status_code == 401
    assert httpx.get(f"{url}{feed}", headers={"X-API-Key": "front-end-key-0001"}).json()[
        "user_id"] == events[0].user_id
    assert httpx.get(f"{url}/readyz").status_code == 200
    # on-demand lists: plain ones (no query, or only k) take the ASGI front's fast path, the
    # rest FastAPI's route; both validate alike and log every list they serve
    lists, key = f"{url}/v1/users/{events[0].user_id}/recommendations", {"X-API-Key":
                                                                        "worker-key-00002"}
    assert httpx.get(lists).status_code == 401
    assert httpx.get(lists, headers={"X-API-Key": "nope"}).status_code == 401
    plain = httpx.get(lists, headers=key).json()
    three = httpx.get(f"{lists}?k=3", headers=key).json()
    assert 0 < len(plain["items"]) <= 20 and len(three["items"]) == 3
    assert plain["source"] == three["source"] == "on_demand"
    top = three["items"][0]["item_id"]
    excluded = httpx.get(f"{lists}?k=3&exclude={top}", headers=key).json()
    assert top not in [i["item_id"] for i in excluded["items"]]
    for bad in ("?k=0", "?k=1001", "?k=x", "?k=99999"):
        assert httpx.get(f"{lists}{bad}", headers=key).status_code == 422, bad
    logged = read_topic(settings.kafka_bootstrap, settings.topic_impressions, 3)
    assert {decode_impression(r.value).recommendation_id for r in logged} == {
        plain["recommendation_id"], three["recommendation_id"], excluded["recommendation_id"]}


def test_blank_api_keys_refuse_to_start_rather_than_serve_open(settings, spawn):
    proc = spawn(["api", "--port", str(free_port()), "--loglevel", "warning"],
                 settings.model_copy(update={"api_keys": " , "}))
    assert proc.proc.wait(60) == 2
    assert "STREAMREC_API_KEYS is set but holds no key" in proc.log()


def _up(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_without_kafka_stored_feeds_are_served_and_fresh_lists_are_refused(settings, spawn,
                                                                           redis_client):
    s = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    events = list(UserSimulator(5, 30, seed=8).events(100, time.time() - 100))
    LiveState(s, redis_client).apply_sync(events)
    FeedBuilder(s, redis_client).refresh_round()  # stored while Kafka was still there
    port = free_port()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning"], s)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up without Kafka", proc=proc)
    user = events[0].user_id
    assert httpx.get(f"{url}/v1/users/{user}/feed", timeout=30).status_code == 200
    started = time.monotonic()
    refused = httpx.get(f"{url}/v1/users/{user}/recommendations", timeout=60)
    assert refused.status_code == 503 and "impression log unavailable" in refused.text
    assert time.monotonic() - started < 15  # a clear answer, not a hung request


def test_anonymous_on_demand_lists_are_rate_limited_stored_feeds_are_not(settings, spawn,
                                                                           redis_client):
    """Without API keys every on-demand list writes an impression record: a burst is cut at
    the configured rate with 429 + Retry-After, and only the lists served were logged."""
    events = list(UserSimulator(10, 60, seed=8).events(300, time.time() - 300))
    LiveState(settings, redis_client).apply_sync(events)
    FeedBuilder(settings, redis_client).refresh_round()
    port = free_port()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning"],
                 settings.model_copy(update={"api_open_lists_per_s": 2.0}))
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=proc)
    user = events[0].user_id
    answers = [httpx.get(f"{url}/v1/users/{user}/recommendations", timeout=30)
               for _ in range(8)]
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert served and refused and len(served) + len(refused) == 8
    assert refused[0].headers["Retry-After"] == "1" and "API key" in refused[0].json()["detail"]
    assert all(httpx.get(f"{url}/v1/users/{user}/feed").status_code == 200 for _ in range(10))
    logged = read_topic(settings.kafka_bootstrap, settings.topic_impressions, len(served) + 1,
                        timeout_s=5)  # waits for one more than served: none must come
    assert sorted(orjson.loads(r.value)["recommendation_id"] for r in logged) == sorted(
        a.json()["recommendation_id"] for a in served)
    time.sleep(1.1)
    assert httpx.get(f"{url}/v1/users/{user}/recommendations", timeout=30).status_code == 200


def test_concurrent_stored_feed_reads_each_get_their_own_feed(api, settings, redis_client):
    """The fast path batches reads that arrive together into one Redis round trip: 400
    requests in flight at once for 40 users (ids with characters that need encoding) each
    get exactly the stored document of the user asked for; a user with no stored feed gets
    an on-demand list."""
    import asyncio

    events = list(UserSimulator(40, 200, seed=10).events(2000, time.time() - 2000))
    events = [msgspec.structs.replace(e, user_id=f"{e.user_id}:é/{{x}}") for e in events]
    LiveState(settings, redis_client).apply_sync(events)
    builder = FeedBuilder(settings, redis_client)
    while builder.refresh_round():
        pass
    users = sorted({e.user_id for e in events}) + ["nobody-yet"]
    keys = RedisKeys(settings.key_prefix)
    stored = {u: redis_client.get(keys.feed(u)) for u in users}

    async def read_all():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=api, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(client.get(f"/v1/users/{u}/feed")
                                          for u in users * 10))

    for user, response in zip(users * 10, asyncio.run(read_all())):
        assert response.status_code == 200
        if stored[user] is None:
            assert response.json()["source"] == "on_demand" and response.json()[
                "user_id"] == user
        else:
            assert response.content == stored[user]


def test_without_redis_feed_reads_answer_503_and_recover(settings, spawn, tmp_path):
    """Redis stopped under a running API: a stored-feed read (the fast path) answers 503
    naming the state store, not a hang or a 500; once Redis is back, the same read is 200."""
    from infra.embedded import EmbeddedRedis
    from infra.redis_client import sync_redis

    with EmbeddedRedis(appendonly=False) as own:
        client = sync_redis(own.url)
        local = settings.model_copy(update={"redis_url": own.url})
        events = list(UserSimulator(5, 30, seed=11).events(100, time.time() - 100))
        LiveState(local, client).apply_sync(events)
        FeedBuilder(local, client).refresh_round()
        port = free_port()
        proc = spawn(["api", "--port", str(port), "--loglevel", "warning"], local)
        url = f"http://127.0.0.1:{port}/v1/users/{events[0].user_id}/feed"
        wait_for(lambda: _up(url), 30, "API up", proc=proc)
        own.stop()
        down = httpx.get(url, timeout=30)
        assert down.status_code == 503 and "state store unavailable" in down.text
        own.start()
        client.set(RedisKeys(local.key_prefix).feed(events[0].user_id), b'{"user_id":"x"}')
        wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, 30, "reads again")


@pytest.mark.parametrize("workers", [1, 2])
def test_api_metrics_count_every_on_demand_list_by_stage(settings, spawn, redis_client,
                                                         workers, tmp_path):
    """STREAMREC_API_METRICS_PORT serves each list's seconds by stage and the answers refused
    by status code; with --workers 2 the supervising process serves the sum of both workers'
    files (in the operator's PROMETHEUS_MULTIPROC_DIR, kept)."""
    events = list(UserSimulator(10, 60, seed=11).events(300, time.time() - 300))
    LiveState(settings, redis_client).apply_sync(events)
    port, metrics_port = free_port(), free_port()
    samples = tmp_path / "api-metrics"
    samples.mkdir()
    proc = spawn(["api", "--port", str(port), "--loglevel", "warning", "--workers",
                  str(workers)], settings.model_copy(update={"api_metrics_port": metrics_port}),
                 **({"PROMETHEUS_MULTIPROC_DIR": str(samples)} if workers > 1 else {}))
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for(lambda: _up(f"{url}/healthz") and _up(metrics_url), 60, "API up", proc=proc)
    users = sorted({e.user_id for e in events})
    served = [httpx.get(f"{url}/v1/users/{user}/recommendations", timeout=30)
              for user in users * 2]  # a connection each: both workers may take some
    assert all(answer.status_code == 200 for answer in served)
    refused = [httpx.get(f"{url}/v1/users/{users[0]}/recommendations?k=0", timeout=30),
               httpx.get(f"{url}/v1/users/{users[0]}/recommendations?k=0", timeout=30),
               httpx.get(f"{url}/v1/nowhere", timeout=30)]
    assert [answer.status_code for answer in refused] == [422, 422, 404]
    text = httpx.get(metrics_url).text
    assert metric(text, "streamrec_http_error_responses_total", code="422") == 2
    assert metric(text, "streamrec_http_error_responses_total", code="404") == 1
    assert metric(text, "streamrec_http_error_responses_total", code="200") == 0
    for stage in ("queued", "computed", "logged", "total"):
        assert metric(text, "streamrec_on_demand_seconds_count", stage=stage) == len(served)
    assert 0 < metric(text, "streamrec_on_demand_seconds_sum", stage="total") < 30 * len(served)
    assert metric(text, "streamrec_on_demand_pass_lists_sum") == len(served)
    if workers == 2:  # the sum of both workers' files, not one process's own figures
        writers = {path.stem.rsplit("_", 1)[1] for path in samples.glob("histogram_*.db")}
        assert len(writers) >= 2  # each worker (and the supervisor, which serves none)
        assert not [line for line in text.splitlines() if line.startswith("process_")]
