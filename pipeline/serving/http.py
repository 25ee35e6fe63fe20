"""HTTP API (FastAPI): recommendations with reasons, similar items, health, readiness and metrics.

    GET  /users/{user_id}/recommendations?k=10&explain=false
    POST /recommendations            {"items": [ids, oldest first], "k": 10, "explain": false}
    GET  /items/{item_id}/similar?k=10
    GET  /health (alive), GET /ready (model and histories loaded), GET /metrics (Prometheus text),
    GET  /docs (OpenAPI)

The server is a thin shell over the Python API (``Recommender``), hence over the one query
path. Bad requests get a 4xx with ``{"error": message}``, never a 5xx; an unknown user gets
a 404 whose body still carries the most popular items (``"fallback": "popular"``). Limits
(``serve`` settings): a body over ``max_body_bytes`` is a 413 (counted as it arrives, so a
huge body is never read whole), a history over ``max_history_items`` ids a 422, and a 422 for
unknown ids lists at most ``max_unknown_ids_shown`` of them with their count. While the
warehouse's histories cannot be read (an ingest holds it at start-up) the server is not
ready: ``/ready`` and every user's recommendations answer 503 with the reason; ad-hoc
histories are still answered. Every response, 5xx included, is counted in ``/metrics``.
When an API token is set (``ATTNREC_SERVE__API_TOKEN`` or ``ATTNREC_API_TOKEN``), every
endpoint except ``/health``, ``/ready`` and the docs needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, ORJSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from pipeline.config import ServeSettings
from pipeline.data.histories import WarehouseUnavailable
from pipeline.data.identity import split_list
from pipeline.errors import UserError
from pipeline.serving.query import MAX_K
from pipeline.serving.recommender import Recommender, UnknownItems

OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}


class ReasonOut(BaseModel):
    item_id: str
    title: str | None
    weight: float


class RecommendationOut(BaseModel):
    item_id: str
    score: float
    title: str | None
    reasons: list[ReasonOut] = []


class RecommendationsOut(BaseModel):
    recommendations: list[RecommendationOut]
    fallback: str | None = Field(None, description='"popular" when there was no usable history')
    model_version: str
    history_length: int = 0
    known_user: bool | None = Field(None, description="whether the warehouse knows the user (null for an ad-hoc history)")


class HistoryRequest(BaseModel):
    items: list[str | int] = Field(..., description="item ids, oldest first (may be empty: most-popular); "
                                                     "at most serve.max_history_items")
    k: int = Field(10, ge=1, le=MAX_K)
    explain: bool = False
    exclude_seen: bool = True
    include_categories: list[str] | None = None
    exclude_categories: list[str] | None = None
    exclude_items: list[str | int] | None = Field(None, description="at most serve.max_history_items")


def create_app(recommender: Recommender, api_token: str | None = None, limits: ServeSettings | None = None) -> FastAPI:
    """The API over one loaded ``Recommender`` (model bundle + warehouse histories)."""
    limits = limits or ServeSettings()
    app = FastAPI(title="attnrec", version="0.1.0",
                  description="Top-k recommendations from a content-aware SASRec, with attention weights as reasons.")
    registry = CollectorRegistry()
    requests_total = Counter("attnrec_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("attnrec_request_seconds", "request latency (s)", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
    app.add_middleware(Guard, token=api_token, max_body=limits.max_body_bytes, counter=requests_total, latency=latency)


    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(UserError)
    async def on_user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(WarehouseUnavailable)
    async def on_warehouse_unavailable(request: Request, exc: WarehouseUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        meta = recommender.bundle.index_meta
        return {"status": "ok", "model_version": recommender.version, "items": recommender.num_items,
                "index": meta.kind, "index_device": meta.device, "ready": recommender.ready()[0]}

    @app.get("/ready")
    def ready() -> JSONResponse:
        ok, reason = recommender.ready()
        return JSONResponse({"ready": ok, "model_version": recommender.version, "reason": reason},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/users/{user_id}/recommendations", response_model=RecommendationsOut)
    def user_recommendations(
        user_id: str,
        k: int = Query(10, ge=1, le=MAX_K),
        explain: bool = False,
        exclude_seen: bool = True,
        include_categories: str | None = Query(None, description="comma-separated"),
        exclude_categories: str | None = Query(None, description="comma-separated"),
        exclude_items: str | None = Query(None, description="comma-separated item ids"),
    ) -> dict[str, Any]:
        answer = recommender.recommend(user=user_id, k=k, explain=explain, exclude_seen=exclude_seen,
                                       include_categories=split_list(include_categories),
                                       exclude_categories=split_list(exclude_categories), exclude_items=split_list(exclude_items))
        if answer.known_user is False:
            return ORJSONResponse({"error": f"unknown user {user_id!r}: not in the warehouse (the most popular items follow)",
                                   **answer.as_dict()}, status_code=404)
        return ORJSONResponse(answer.as_dict())

    @app.post("/recommendations", response_model=RecommendationsOut)
    def history_recommendations(body: HistoryRequest) -> dict[str, Any]:
        for field, ids in (("items", body.items), ("exclude_items", body.exclude_items or [])):
            if len(ids) > limits.max_history_items:
                return JSONResponse({"error": f"{field}: at most {limits.max_history_items:,} item ids "
                                              f"(serve.max_history_items), got {len(ids):,}"}, status_code=422)
        try:
            answer = recommender.recommend(
                items=[str(i) for i in body.items], k=body.k, explain=body.explain, exclude_seen=body.exclude_seen,
                include_categories=body.include_categories, exclude_categories=body.exclude_categories,
                exclude_items=[str(i) for i in body.exclude_items] if body.exclude_items else None)
        except UnknownItems as exc:
            shown = exc.ids[:limits.max_unknown_ids_shown]
            return JSONResponse({"error": f"unknown item ids: {', '.join(shown)}" + (" ..." if len(exc.ids) > len(shown) else ""),
                                 "unknown_items": shown, "unknown_count": len(exc.ids)}, status_code=422)
        return ORJSONResponse(answer.as_dict())

    @app.get("/items/{item_id}/similar", response_model=RecommendationsOut)
    def similar_items(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        try:
            return ORJSONResponse(recommender.similar(item_id, k).as_dict())
        except UnknownItems:
            return JSONResponse({"error": f"unknown item id {item_id!r}"}, status_code=404)

    return app


def _endpoint_of(path: str) -> str:
    """A bounded label for metrics (no raw ids in label values)."""
    if path.startswith("/users/") and path.endswith("/recommendations"):
        return "/users/{user_id}/recommendations"
    if path.startswith("/items/") and path.endswith("/similar"):
        return "/items/{item_id}/similar"
    if path in {"/recommendations", "/metrics"} or path in OPEN_PATHS:
        return path
    return "other"


class _BodyTooLarge(Exception):
    pass


class Guard:
    """The outermost layer of the app (pure ASGI): the bearer token (401), the body limit (413,
    checked on the declared length and again on the bytes as they arrive, so a huge body is
    never read whole) and the metrics of every response, 5xx included (an exception is counted
    as the 500 the server answers)."""

    def __init__(self, app: Any, token: str | None, max_body: int, counter: Counter, latency: Histogram) -> None:
        self.app, self.token, self.max_body, self.counter, self.latency = app, token, max_body, counter, latency

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, started = scope["path"], time.perf_counter()
        state = {"status": 500, "over": False, "sent": False}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        too_large = {"error": f"request body larger than {self.max_body:,} bytes"}

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["over"]:  # the app's answer to a cut-off body is replaced by the 413
                return
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body and not state["sent"]:
                    state["over"] = True
                    raise _BodyTooLarge
            return message

        try:
            if self.token and path not in OPEN_PATHS and not hmac.compare_digest(
                    headers.get("authorization", "").encode(), f"Bearer {self.token}".encode()):
                await _send_json(guarded_send, 401, {"error": "missing or wrong bearer token"},
                                 [(b"www-authenticate", b"Bearer")])
            elif headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")) > self.max_body:
                await _send_json(guarded_send, 413, too_large, [(b"connection", b"close")])  # the body is never read
            else:
                try:
                    await self.app(scope, limited_receive, guarded_send)
                except _BodyTooLarge:
                    pass  # the app did not catch it: the 413 follows
                if state["over"]:
                    state["over"] = False
                    await _send_json(guarded_send, 413, too_large, [(b"connection", b"close")])
        except Exception:
            if not state["over"]:
                state["status"] = 500
            raise
        finally:
            endpoint = _endpoint_of(path)
            self.counter.labels(endpoint, str(state["status"])).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
