"""Fuzzing the HTTP handlers (Hypothesis, 10,000 requests): odd paths, ids, query strings,
headers and bodies against the real app (in-process, real Redis and broker) never get a 5xx
other than a documented 503, and never crash the app; every 4xx says why."""

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from serving.api import create_app

FUZZ = hsettings(max_examples=10_000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow,
                                        HealthCheck.function_scoped_fixture])

ids = st.sampled_from(["", "u1", "a/b", "x" * 256, "x" * 257, "%00", "..", "%2F", "é{}:",
                       "%ZZ", " "]) | st.text(max_size=20)
query = st.lists(st.tuples(st.sampled_from(["k", "exclude", "pin", "zz", ""]),
                           st.sampled_from(["", "0", "1", "-1", "20", "1001", "3:x", "x",
                                            "1e9", "%", "0:" + "y" * 300])
                           | st.text(max_size=12)), max_size=4)
bodies = (st.binary(max_size=300)
          | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                         lambda c: st.lists(c, max_size=3)
                         | st.dictionaries(st.text(max_size=10), c, max_size=4),
                         max_leaves=12).map(lambda v: json.dumps(v).encode()))
event_ids = st.text(min_size=1, max_size=8)
events = st.fixed_dictionaries(
    {"event_id": event_ids, "user_id": event_ids, "item_id": event_ids,
     "type": st.sampled_from(["click", "like", "view", "teleport"]),
     "timestamp": st.sampled_from([1.7e9, 0, 1.7e9 + 0.5])},
    optional={"position": st.integers(-1, 3), "context": st.dictionaries(
        st.text(max_size=4), st.integers(), max_size=2)})
bodies = bodies | events.map(lambda e: json.dumps(e).encode()) | st.lists(
    events, min_size=1, max_size=3).map(lambda es: json.dumps({"events": es}).encode())
ids = ids.map(lambda u: quote(u, safe="/%"))  # any text reaches the server, percent-encoded
requests = st.one_of(
    st.tuples(st.just("GET"), ids.map(lambda u: f"/v1/users/{u}/feed"), query, st.none()),
    st.tuples(st.just("GET"), ids.map(lambda u: f"/v1/users/{u}/recommendations"), query,
              st.none()),
    st.tuples(st.just("GET"), ids.map(lambda i: f"/v1/items/{i}/similar"), query, st.none()),
    st.tuples(st.just("GET"), st.just("/v1/trending"), query, st.none()),
    st.tuples(st.just("POST"), st.just("/v1/events"), st.just([]), bodies),
    st.tuples(st.just("POST"), ids.map(lambda u: f"/v1/users/{u}/erase"), st.just([]),
              st.none() | bodies | st.fixed_dictionaries(
                  {}, optional={"session_ids": st.lists(ids, max_size=3) | st.integers(),
                                "request_id": ids | st.integers()}).map(
                  lambda b: json.dumps(b).encode())),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
              st.text(max_size=30).map(lambda p: "/" + quote(p, safe="/")), query, st.none()),
)


@pytest.mark.integration
def test_no_request_gets_a_server_error(settings):
    app = create_app(settings.model_copy(update={"api_open_lists_per_s": 50.0}))
    seen: dict[int, int] = {}
    with TestClient(app, raise_server_exceptions=False) as client:

        @FUZZ
        @given(requests, st.sampled_from([None, "", "short", "x" * 40]))
        def check(request, api_key):
            method, path, params, body = request
            headers = {"content-type": "application/json"}
            if api_key is not None:
                headers["x-api-key"] = api_key
            response = client.request(method, path, params=params, content=body,
                                      headers=headers)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500 or response.status_code == 503, (
                method, path, params, body, response.status_code, response.text[:300])
            if 400 <= response.status_code < 500 and response.status_code != 404:
                assert response.json().get("detail"), response.text[:300]

        check()
        assert client.get("/healthz").status_code == 200
    assert {200, 202, 422} <= set(seen), seen  # the fuzz reached real answers, not only errors
