"""With the broker paused (SIGSTOP), the API answers within its documented timeout, never says
"failed" about events that may still apply, and a retry with the same ids applies them once."""

import os
import signal
import time

import httpx
import orjson

from infra.embedded import free_port
from schemas.keys import RedisKeys
from tests.conftest import wait_for
from tests.integration.kafka_helpers import private_broker


def test_paused_broker_gets_timely_unknown_answers_and_retries_apply_once(
        settings, redis_client, spawn):
    keys = RedisKeys(settings.key_prefix)
    with private_broker(settings, kafka_ack_timeout_s=2.0) as (broker, s):
        worker = spawn(["worker", "--loglevel", "warn"], s)
        port = free_port()
        api = spawn(["api", "--port", str(port), "--loglevel", "warning"], s)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(f"{url}/healthz"), 30, "API up", proc=api)
        now = time.time()
        first = {"event_id": "warm-up", "user_id": "p1", "item_id": "i1", "type": "click",
                 "timestamp": now}
        assert httpx.post(f"{url}/v1/events", content=orjson.dumps(first),
                          timeout=30).status_code == 202  # connected while the broker runs
        wait_for(lambda: int(redis_client.hget(keys.stats, "events_applied") or 0) == 1, 60,
                 "the first event to apply", proc=worker)

        os.kill(broker.proc.pid, signal.SIGSTOP)
        events = [{**first, "event_id": f"paused-{n}", "item_id": f"i{n}"} for n in range(3)]
        started = time.monotonic()
        answer = httpx.post(f"{url}/v1/events", content=orjson.dumps({"events": events}),
                            timeout=60)
        elapsed = time.monotonic() - started
        fresh = httpx.get(f"{url}/v1/users/p1/recommendations", timeout=60)
        fresh_elapsed = time.monotonic() - started - elapsed
        os.kill(broker.proc.pid, signal.SIGCONT)

        assert answer.status_code == 503, (answer.status_code, answer.text)
        assert answer.json().get("status") == "unknown", answer.text
        assert answer.json()["event_ids"] == [e["event_id"] for e in events]
        assert answer.headers["retry-after"] == "1"
        assert elapsed < 2.0 + 2.5, elapsed  # the documented timeout, not 30 s
        assert fresh.status_code == 503 and fresh_elapsed < 2.0 + 2.5, fresh_elapsed

        def retried() -> bool:  # the client retries with the same ids, as the answer says
            response = httpx.post(f"{url}/v1/events", content=orjson.dumps({"events": events}),
                                  timeout=30)
            return response.status_code == 202

        wait_for(retried, 60, "a retry to be accepted once the broker is back", interval_s=1)
        wait_for(lambda: int(redis_client.hget(keys.stats, "events_applied") or 0) >= 4, 60,
                 "the retried events to apply", proc=worker)
        time.sleep(2)
        assert int(redis_client.hget(keys.stats, "events_applied")) == 4  # each once


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
