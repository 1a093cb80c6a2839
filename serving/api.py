"""HTTP API: feeds, on-demand recommendations, similar items, events in, health.
OpenAPI docs at ``/docs``.

Run with ``streamrec api`` (uvicorn). The API never writes model state: posted events are
validated and produced to Kafka like any other producer's. Every list it computes is logged to
the impressions topic before it is returned. With ``STREAMREC_API_KEYS`` set, every ``/v1``
route needs the header ``X-API-Key``; without keys, lists computed on demand are rate-limited
(``STREAMREC_API_OPEN_LISTS_PER_S``), so anonymous callers cannot flood the impression log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import pathlib
import queue
import threading
import time
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from infra.redis_client import TRANSIENT_REDIS_ERRORS, mget_any, mget_any_async, sync_redis
from infra.settings import Settings
from schemas import dlq
from schemas.events import (MAX_ID_CHARS, InvalidEvent, decode_erasure_body,
                            erasure_body_schema, json_schema, split_message)
from serving import metrics
from serving.feeds import FeedBuilder, ImpressionLogUnavailable
from serving.stats import LiveStats
from schemas.items import json_schema as items_json_schema
from schemas.items import split_items
from stream.producer import DeliveryError, InteractionProducer, ItemPublisher


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json",
                    headers=headers)


#: The feed explorer's page, script and style (served at ``/explorer/``; no CDN).
EXPLORER_ASSETS = str(pathlib.Path(__file__).with_name("explorer"))

#: Ids on paths follow the event contract: 1..256 characters (else 422).
UserId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
ItemId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]


def _body(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a route that reads its JSON body itself."""
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": schema}}}}


def require_ids(ids, what: str) -> None:
    """422 unless every id of a query list follows the event contract (1..256 characters)."""
    if any(not item or len(item) > MAX_ID_CHARS for item in ids):
        raise HTTPException(422, f"{what} must have 1..{MAX_ID_CHARS} characters")


def parse_pins(values, k: int, exclude) -> tuple[tuple[int, str], ...]:
    """``pin=<position>:<item_id>`` values as (position, item); 422 for a malformed one, a
    position past the list (``k``), a position or an item pinned twice, or an item pinned and
    excluded (each would leave the list ambiguous)."""
    pins: dict[int, str] = {}
    for value in values:
        digits, sep, item = value.partition(":")
        if not sep or not digits.isdigit() or not 0 < len(item) <= MAX_ID_CHARS:
            raise HTTPException(422, f"pin must be <position>:<item_id>, not {value!r}")
        position = int(digits)
        if position >= k:
            raise HTTPException(422, f"pin {value!r}: position {position} is past the list "
                                     f"(k={k}; positions start at 0)")
        if position in pins or item in pins.values():
            raise HTTPException(422, f"pin {value!r}: its position or its item is pinned twice")
        if item in exclude:
            raise HTTPException(422, f"pin {value!r}: the item is also excluded")
        pins[position] = item
    return tuple(pins.items())


def create_app(settings: Settings | None = None) -> "FastPaths":
    """Build the API for these settings (``Settings()`` reads ``STREAMREC_*``): the FastAPI
    app behind :class:`FastPaths`, which answers the hottest read itself."""
    settings = settings or Settings()
    redis_client = sync_redis(settings.redis_url)
    builder = FeedBuilder.live(settings, redis_client)
    keys = settings.api_key_set

    async def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        # async: a plain check, not worth a trip to the thread pool
        if keys and x_api_key not in keys:
            raise HTTPException(401, "missing or unknown X-API-Key",
                                headers={"WWW-Authenticate": "X-API-Key"})

    producer_lock = threading.Lock()
    producers: dict[type, InteractionProducer] = {}

    def get_producer(kind: type = InteractionProducer) -> InteractionProducer:
        """The process's producer of events (or of item descriptions), made on first use."""
        with producer_lock:
            if kind not in producers:
                topic = (settings.topic_items if kind is ItemPublisher
                         else settings.topic_interactions)
                producers[kind] = kind(settings.kafka_bootstrap, topic,
                                       max_message_bytes=settings.max_message_bytes,
                                       client_options=settings.kafka_client_options())
            return producers[kind]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # what was built before serving (imports, models, the ANN index) lives as long as the
        # process: out of the collector's full passes, whose pauses were the on-demand lists'
        # slowest passes (one: 131 ms before, 8 ms after; bench/on_demand.py)
        gc.freeze()
        stop_metrics = None  # with --workers N the supervising process serves their sum
        if settings.api_metrics_port and not os.environ.get(metrics.MULTIPROC_ENV):
            stop_metrics = metrics.serve(settings.api_metrics_port, settings.api_metrics_host)
        yield
        if stop_metrics is not None:
            stop_metrics()
        await front.close()
        for sdk in producers.values():
            sdk.close()
        builder.close()
        live_stats.close()
        redis_client.close()

    # Swagger UI and ReDoc from the fastapi-offline package, not a CDN: /docs works offline
    api = FastAPIOffline(title="streamrec", version="0.1.0", lifespan=lifespan,
                         description="Real-time recommendations: feeds from Redis, events to "
                         "Kafka. The feed explorer is at /explorer/.")
    live_stats = LiveStats(settings, redis_client)

    async def _redis_down(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"state store unavailable: {exc!r}"}, status_code=503)

    for error in TRANSIENT_REDIS_ERRORS:
        api.add_exception_handler(error, _redis_down)

    async def _log_down(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{exc} (a list is never served unlogged)"},
                            status_code=503)

    api.add_exception_handler(ImpressionLogUnavailable, _log_down)

    on_demand_batches = OnDemandBatches(
        lambda users, k, exclude, pins: builder.compute(users, k, exclude, source="on_demand",
                                                        pins=pins),
        builder.log_served, linger_s=settings.api_batch_linger_ms / 1000)

    # without keys anyone may ask: bound the impression records they can make us write
    open_lists = None if keys else TokenBucket(settings.api_open_lists_per_s)

    def check_open_lists() -> None:
        if open_lists is not None and not open_lists.take():
            raise HTTPException(429, "too many on-demand lists without an API key (each is "
                                "logged); set STREAMREC_API_KEYS or retry later",
                                headers={"Retry-After": "1"})

    def on_demand(user_id: str, k: int | None, exclude: frozenset[str] = frozenset(),
                  pins: tuple[tuple[int, str], ...] = ()):
        check_open_lists()
        return on_demand_batches.feed(user_id, k, exclude, pins)

    authed = [Depends(require_key)]

    @api.get("/v1/users/{user_id:path}/feed", summary="A user's feed", response_model=None,
             dependencies=authed)
    def read_feed(user_id: UserId, k: Annotated[int | None, Query(ge=1, le=1000)] = None
                  ) -> Response:
        """The stored feed; computed on demand (``source: on_demand``) when none is stored
        or when ``k`` asks for another size."""
        if k is None:  # the common read: the stored document as it is, no decode/encode
            raw = builder.read_raw(user_id)
            if raw:
                return Response(raw, media_type="application/json")
        feed = builder.read(user_id)
        if feed is None or (k is not None and k != len(feed.items)):
            feed = on_demand(user_id, k)
        return _json(feed)

    @api.get("/v1/users/{user_id:path}/recommendations", summary="Recommend now",
             response_model=None, dependencies=authed)
    async def recommend(user_id: UserId, k: Annotated[int, Query(ge=1, le=1000)] = 20,
                        exclude: Annotated[list[str], Query(max_length=1000)] = (),
                        pin: Annotated[list[str], Query(max_length=100)] = ()) -> Response:
        """A fresh list from the serving pipeline (candidates → rank → re-rank → explore),
        never containing ``exclude`` (repeat the parameter) or the user's recent items;
        ``pin=<position>:<item_id>`` (repeatable) fixes an item at a 0-based position."""
        require_ids(exclude, "exclude ids")
        excluded = frozenset(exclude)
        pins = parse_pins(pin, k, excluded)
        check_open_lists()  # the batch runs on threads: the event loop only awaits it
        return _json(await on_demand_batches.feed_async(user_id, k, excluded, pins))

    @api.get("/v1/items/{item_id:path}/similar", summary="Similar items", response_model=None,
             dependencies=authed)
    def similar(item_id: ItemId, k: Annotated[int, Query(ge=1, le=1000)] = 20) -> Response:
        """Items co-occurring with ``item_id`` and its nearest neighbours by MF vector."""
        return _json({"item_id": item_id, "items": builder.similar_items(item_id, k)})

    @api.get("/v1/trending", summary="Trending items", dependencies=authed)
    def trending(k: Annotated[int, Query(ge=1, le=1000)] = 20) -> Response:
        return _json([{"item_id": i, "score": s} for i, s in builder.trending(k)])

    async def publish(request: Request, split, kind: type, what: str, id_field: str,
                      retry_hint: str) -> Response:
        """Validate the body with ``split`` (all-or-nothing: any invalid record → 422 naming
        each field, nothing sent), send the records with the ``kind`` of producer and wait for
        Kafka's acks: 202, or 503 saying what is known."""
        raw = await read_body(request, settings.max_message_bytes)
        records, invalid = split(raw, settings.max_message_bytes)
        if invalid:
            problems = [{"index": index, **err} for index, _, exc in invalid
                        for err in exc.errors]
            return _json({"detail": f"invalid {what}; nothing was published",
                          "problems": problems[:dlq.MAX_PROBLEMS],
                          "problems_omitted": max(len(problems) - dlq.MAX_PROBLEMS, 0)}, 422)

        def send() -> None:
            sdk = get_producer(kind)
            sdk.send_many(records)
            sdk.flush(timeout_s=settings.kafka_ack_timeout_s)

        try:
            await run_in_threadpool(send)
        except DeliveryError as exc:
            # sent but not acknowledged in time: Kafka may still take them, so the outcome is
            # unknown; the caller may retry (see ``retry_hint``)
            return _json({"status": "unknown", "detail": f"Kafka did not acknowledge within "
                          f"{settings.kafka_ack_timeout_s:g} s ({exc}); {retry_hint}",
                          f"{id_field}s": [getattr(r, id_field) for r in records]},
                         503, headers={"Retry-After": "1"})
        except Exception as exc:  # broker unreachable at connect time: nothing was sent
            raise HTTPException(503, f"Kafka unavailable: {exc!r}") from exc
        return _json({"accepted": len(records)}, 202)

    @api.post("/v1/events", status_code=202, summary="Publish interactions", dependencies=authed,
              openapi_extra=_body(json_schema(erasure=False), required=True))
    async def post_events(request: Request) -> Response:
        """One event or an envelope. All-or-nothing: any invalid event → 422, nothing sent."""
        return await publish(request, split_message, InteractionProducer, "events", "event_id",
                             "the events may still be applied: retry with the same "
                             "event_ids, duplicates are dropped")

    @api.post("/v1/items", status_code=202, summary="Publish item descriptions",
              dependencies=authed, openapi_extra=_body(items_json_schema(), required=True))
    async def post_items(request: Request) -> Response:
        """One item description or ``{"items": [...]}`` (schemas/items.py): each is the
        item's whole description. All-or-nothing: any invalid one → 422, nothing sent."""
        return await publish(request, split_items, ItemPublisher, "item descriptions",
                             "item_id", "sending the same descriptions again is safe (the "
                             "newest per item wins)")

    @api.post("/v1/users/{user_id:path}/erase", status_code=202, summary="Erase a user",
              response_model=None, dependencies=authed,
              openapi_extra=_body(erasure_body_schema(), required=False))
    async def erase_user(user_id: UserId, request: Request) -> Response:
        """Erase what the workers learned of the user: their user-keyed model state, their
        sessions' (those in ``session_ids``, and the one keyed by the user id), history, feed
        and place in the feed queue (docs/events.md#erasure). The request goes after the
        user's earlier events on their partition; 202 says where it landed (applied once the
        worker's watermark of ``partition`` reaches ``offset``: ``streamrec erase --wait``).
        Body (optional): ``{"session_ids": [...], "request_id": "..."}``."""
        raw = await read_body(request, settings.max_message_bytes)
        try:
            body = decode_erasure_body(raw)
            receipt = await run_in_threadpool(
                lambda: get_producer().erase_user(user_id, body.session_ids, body.request_id,
                                                  timeout_s=settings.kafka_ack_timeout_s))
        except InvalidEvent as exc:
            return _json({"detail": "invalid erasure request; nothing was published",
                          "problems": exc.errors}, 422)
        except DeliveryError as exc:
            return _json({"status": "unknown", "detail": f"Kafka did not acknowledge within "
                          f"{settings.kafka_ack_timeout_s:g} s ({exc}); the erasure may still "
                          f"apply: send it again (erasing twice is harmless)"}, 503,
                         headers={"Retry-After": "1"})
        except Exception as exc:  # broker unreachable at connect time: nothing was sent
            raise HTTPException(503, f"Kafka unavailable: {exc!r}") from exc
        return _json({"request_id": receipt.request_id, "user_id": user_id,
                      "topic": receipt.topic, "partition": receipt.partition,
                      "offset": receipt.offset}, 202)

    @api.get("/v1/items/{item_id:path}", summary="An item's description", response_model=None,
             dependencies=authed)
    def item_description(item_id: ItemId) -> Response:
        """The item's latest description as stored by the worker (404 when none arrived)."""
        raw = redis_client.get(builder.keys.item_description(item_id))
        if raw is None:
            raise HTTPException(404, f"no description of item {item_id!r}")
        return Response(raw, media_type="application/json")

    @api.get("/v1/users", summary="Find users", response_model=None, dependencies=authed)
    def find_users(prefix: Annotated[str, Query(max_length=MAX_ID_CHARS)] = "",
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        """Users with recent activity (a history in Redis) whose id starts with ``prefix``,
        sorted; the SCAN (1,000 keys a call) stops once ``limit`` are found."""
        found: set[str] = set()  # a set: SCAN may return a key twice
        for key in redis_client.scan_iter(match=builder.keys.user_history_pattern(prefix),
                                          count=1000):
            found.add(builder.keys.user_of_history_key(key.decode()))
            if len(found) >= limit:
                break
        return _json({"prefix": prefix, "users": sorted(found)})

    @api.get("/v1/users/{user_id:path}/history", summary="A user's recent items",
             response_model=None, dependencies=authed)
    def history(user_id: UserId) -> Response:
        """The items the user interacted with recently, newest first: the context the
        serving pipeline ranks with and the seen-filter."""
        [items] = builder.histories([user_id])
        return _json({"user_id": user_id, "items": list(reversed(items))})

    @api.get("/v1/items", summary="Item descriptions", response_model=None,
             dependencies=authed)
    def item_descriptions(ids: Annotated[list[str], Query(alias="id", min_length=1,
                                                          max_length=200)]) -> Response:
        """The latest descriptions of up to 200 items (``id`` repeated): null where none
        arrived."""
        require_ids(ids, "ids")
        raw = mget_any(redis_client, [builder.keys.item_description(item) for item in ids])
        return _json({"items": {item: msgspec.json.decode(value) if value else None
                                for item, value in zip(ids, raw)}})

    @api.get("/v1/stats", summary="Live worker figures", response_model=None,
             dependencies=authed)
    def stats() -> Response:
        """Events applied, events/s, consumer lag per partition, freshness p50/p99 (the
        slowest worker's, over its last minute), dead letters, one report per live worker."""
        return _json(live_stats.read())

    api.mount("/explorer", StaticFiles(directory=EXPLORER_ASSETS, html=True), name="explorer")

    @api.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/explorer/")

    @api.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: Redis reachable")
    def readyz() -> Response:
        try:
            redis_client.ping()
        except TRANSIENT_REDIS_ERRORS as exc:
            return _json({"status": "unavailable", "redis": repr(exc)}, 503)
        return _json({"status": "ready", "redis": "ok"})

    async def plain_list(user_id: str, k: int) -> bytes:
        return msgspec.json.encode(await on_demand_batches.feed_async(user_id, k))

    front = FastPaths(api, settings.redis_url, builder.keys.feed, keys, plain_list)
    return front


class FastPaths:
    """ASGI front for the hottest requests, with no framework in between:
    ``GET /v1/users/<id>/feed`` with no query (the stored bytes as they are; reads that arrive
    while one Redis round trip is out are batched into the next MGET, so Redis client cost is
    paid per batch) and, with API keys configured, ``GET /v1/users/<id>/recommendations`` with
    no query or only ``k`` (``plain_list(user_id, k)``: an on-demand list's JSON). Anything
    else — other parameters, a missing feed, a bad or missing key, any error — goes to ``app``
    (FastAPI), which validates and answers as documented (on-demand list, 401, 422, 429, 503)."""

    PREFIX, SUFFIX, LISTS = "/v1/users/", "/feed", "/recommendations"

    def __init__(self, app: FastAPI, redis_url: str, feed_key, api_keys: frozenset[str],
                 plain_list=None) -> None:
        self.app, self.redis_url, self.feed_key = app, redis_url, feed_key
        self.api_keys = {key.encode() for key in api_keys}
        self.plain_list = plain_list
        self.redis = None  # redis.asyncio client, made on the serving event loop
        self.waiting: list[tuple[str, asyncio.Future]] = []
        self.in_flight = False

    async def __call__(self, scope, receive, send) -> None:
        raw = None
        if scope["type"] == "http" and scope["method"] == "GET":
            raw = await (self._plain_list(scope) if scope["path"].endswith(self.LISTS)
                         else self._stored_feed(scope))
        if raw is None:
            await self.app(scope, receive, counting_errors(send) if scope["type"] == "http"
                           else send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]})
        await send({"type": "http.response.body", "body": raw})

    def _user(self, scope, suffix: str) -> str | None:
        """The user id of ``/v1/users/<id><suffix>`` when the request may skip the framework
        (valid id; the API key, where keys are configured), else None."""
        path = scope["path"]
        if not path.startswith(self.PREFIX) or not path.endswith(suffix):
            return None
        user_id = path[len(self.PREFIX):-len(suffix)]
        if not 0 < len(user_id) <= MAX_ID_CHARS:
            return None
        if self.api_keys and not any(name == b"x-api-key" and value in self.api_keys
                                     for name, value in scope["headers"]):
            return None
        return user_id

    async def _plain_list(self, scope) -> bytes | None:
        query = scope["query_string"]
        k = 20
        if query:
            if not query.startswith(b"k=") or not query[2:].isdigit() or len(query) > 6:
                return None
            k = int(query[2:])
        # without keys, open lists are rate-limited: FastAPI's route applies the limit
        if self.plain_list is None or not self.api_keys or not 1 <= k <= 1000:
            return None
        user_id = self._user(scope, self.LISTS)
        if user_id is None:
            return None
        try:
            return await self.plain_list(user_id, k)
        except Exception:  # noqa: BLE001 - FastAPI's route retries and answers the error
            return None

    async def _stored_feed(self, scope) -> bytes | None:
        if scope["query_string"]:
            return None
        user_id = self._user(scope, self.SUFFIX)
        if user_id is None:
            return None
        if self.redis is None:
            from infra.redis_client import async_redis
            self.redis = async_redis(self.redis_url)
        try:
            return await self._get(self.feed_key(user_id))
        except TRANSIENT_REDIS_ERRORS:
            return None

    async def _get(self, key: str) -> bytes | None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((key, future))
        if not self.in_flight:
            self.in_flight = True
            asyncio.get_running_loop().call_soon(self._send_batch)  # after this tick's arrivals
        return await future

    def _send_batch(self) -> None:
        batch, self.waiting = self.waiting, []
        asyncio.ensure_future(self._read_batch(batch))

    async def _read_batch(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        try:
            values = await mget_any_async(self.redis, [key for key, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error
            values = [exc] * len(batch)
        for (_, future), value in zip(batch, values):
            if not future.done():
                (future.set_exception if isinstance(value, Exception) else future.set_result)(
                    value)
        if self.waiting:
            self._send_batch()
        else:
            self.in_flight = False

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


def counting_errors(send):
    """``send`` that counts answers of status 400 or more (``streamrec_http_error_responses_total``
    by code)."""
    async def counted(message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            metrics.HTTP_ERRORS.labels(str(message["status"])).inc()
        await send(message)
    return counted


class OnDemandBatches:
    """Concurrent on-demand lists share one pipeline pass and one impression-log flush (group
    commit). Requests queue; a compute thread takes everything waiting (up to ``max_batch``)
    and runs ``compute(users, k, exclude, pins)`` once per distinct ``(k, exclude, pins)``;
    a log thread then logs the batch with ``log(feeds)`` and only then answers its requests
    (a list is never served unlogged). The two threads overlap: batch N+1 is computed while
    batch N waits for Kafka's acks, and the batches computed meanwhile are logged together.
    An error reaches every request of its batch (of its flush, for the log's). Thread-safe;
    :meth:`feed` blocks, :meth:`feed_async` awaits (no thread held while waiting).

    ``linger_s``: a pass costs a fixed part (reads, numpy calls) plus a part per list, so while
    requests come faster than one per ``linger_s`` (a moving average of their gaps) the pass
    waits until its oldest request is ``linger_s`` old or ``enough`` requests share it (the
    fixed part is then paid; waiting longer would leave the core idle); slower, no wait."""

    def __init__(self, compute, log, max_batch: int = 64, linger_s: float = 0.0,
                 enough: int = 16) -> None:
        self.compute, self.log, self.max_batch = compute, log, max_batch
        self.linger_s, self.enough = linger_s, enough
        self._gap: float | None = None  # moving average of the gap between requests
        self._last_arrival: float | None = None
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._computed: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        self._start_lock = threading.Lock()

    def submit(self, user_id: str, k: int | None, exclude: frozenset[str] = frozenset(),
               pins: tuple[tuple[int, str], ...] = ()) -> concurrent.futures.Future:
        """Queue a request; the future gets its feed (or the batch's error)."""
        if not self._started:
            with self._start_lock:
                if not self._started:
                    for target, name in ((self._compute_loop, "on-demand-compute"),
                                         (self._log_loop, "on-demand-log")):
                        threading.Thread(target=target, name=name, daemon=True).start()
                    self._started = True
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._waiting.put(((k, exclude, pins), user_id, future, time.perf_counter()))
        return future

    def feed(self, user_id: str, k: int | None, exclude: frozenset[str] = frozenset(),
             pins: tuple[tuple[int, str], ...] = ()):
        return self.submit(user_id, k, exclude, pins).result()

    async def feed_async(self, user_id: str, k: int | None,
                         exclude: frozenset[str] = frozenset(),
                         pins: tuple[tuple[int, str], ...] = ()):
        return await asyncio.wrap_future(self.submit(user_id, k, exclude, pins))

    def _compute_loop(self) -> None:
        while True:
            batch = self._take_batch()
            groups: dict[tuple, list] = {}
            for request in batch:
                groups.setdefault(request[0], []).append(request)
            started, cpu = time.perf_counter(), time.thread_time()
            metrics.PASS_LISTS.observe(len(batch))
            try:
                feeds = []
                for (k, exclude, pins), members in groups.items():
                    computed = self.compute([m[1] for m in members], k, exclude, pins)
                    feeds += zip(members, computed)
                ended = time.perf_counter()
                metrics.PASS_WALL.observe(ended - started)
                metrics.PASS_CPU.observe(time.thread_time() - cpu)
                self._computed.put((feeds, None, started, ended))
            except BaseException as exc:  # every request of the batch gets the error
                self._computed.put(([(m, None) for m in batch], exc, started, 0.0))

    def _take_batch(self) -> list:
        """What is waiting (blocks for the first), lingering for more while they come fast."""
        batch = [self._waiting.get()]
        lingers = self._gap is not None and self._gap < self.linger_s
        until = batch[0][3] + self.linger_s if lingers else 0.0
        while len(batch) < self.max_batch:
            try:
                left = until - time.perf_counter() if len(batch) < self.enough else 0.0
                batch.append(self._waiting.get(timeout=left) if left > 0
                             else self._waiting.get_nowait())
            except queue.Empty:
                break
        for request in batch if self.linger_s else ():  # gaps matter only to a linger
            if self._last_arrival is not None:
                gap = max(request[3] - self._last_arrival, 0.0)
                self._gap = gap if self._gap is None else self._gap + 0.1 * (gap - self._gap)
            self._last_arrival = request[3]
        return batch

    def _log_loop(self) -> None:
        while True:
            passes = [self._computed.get()]  # and every pass computed while the last was logged:
            while True:  # one flush and one wait for acks for all of them
                try:
                    passes.append(self._computed.get_nowait())
                except queue.Empty:
                    break
            answers = [answer for pass_answers, error, *_ in passes if error is None
                       for answer in pass_answers]
            logged = None
            if answers:
                try:
                    self.log([feed for _, feed in answers])
                except BaseException as exc:
                    logged = exc
            now = time.perf_counter()
            for pass_answers, error, started, computed in passes:
                if error is not None or logged is not None:
                    metrics.FAILED.labels("compute" if error else "log").inc(len(pass_answers))
                    for request, _ in pass_answers:
                        request[2].set_exception(error or logged)
                    continue
                for request, feed in pass_answers:
                    metrics.QUEUED.observe(started - request[3])
                    metrics.COMPUTED.observe(computed - started)
                    metrics.LOGGED.observe(now - computed)
                    metrics.TOTAL.observe(now - request[3])
                    request[2].set_result(feed)


class TokenBucket:
    """``rate`` takes per second on average, bursts up to one second's worth (0: none);
    thread-safe."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, max(rate, 1.0) if rate > 0 else 0.0
        self.tokens, self.stamp = self.capacity, time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (a
    declared Content-Length, or the bytes streamed so far): never buffered beyond the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds the {limit}-byte limit")
    return bytes(body)
