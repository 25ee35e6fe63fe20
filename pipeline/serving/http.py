"""HTTP API (FastAPI): recommendations with reasons, similar items, health and metrics.

    GET  /users/{user_id}/recommendations?k=10&explain=false
    POST /recommendations            {"items": [ids, oldest first], "k": 10, "explain": false}
    GET  /items/{item_id}/similar?k=10
    GET  /health, GET /metrics (Prometheus text), GET /docs (OpenAPI)

The server is a thin shell over the Python API (``Recommender``), hence over the one query
path. Bad requests get a 4xx with ``{"error": message}``, never a 5xx; an unknown user gets
a 404 whose body still carries the most popular items (``"fallback": "popular"``). When an
API token is set
(``ATTNREC_SERVE__API_TOKEN`` or ``ATTNREC_API_TOKEN``), every endpoint except ``/health``
and the docs needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, ORJSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from pipeline.data.identity import split_list
from pipeline.errors import UserError
from pipeline.serving.query import MAX_K
from pipeline.serving.recommender import Recommender, UnknownItems

OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}


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
    items: list[str | int] = Field(..., description="item ids, oldest first (may be empty: most-popular)")
    k: int = Field(10, ge=1, le=MAX_K)
    explain: bool = False
    exclude_seen: bool = True
    include_categories: list[str] | None = None
    exclude_categories: list[str] | None = None
    exclude_items: list[str | int] | None = None


def create_app(recommender: Recommender, api_token: str | None = None) -> FastAPI:
    """The API over one loaded ``Recommender`` (model bundle + warehouse histories)."""
    app = FastAPI(title="attnrec", version="0.1.0",
                  description="Top-k recommendations from a content-aware SASRec, with attention weights as reasons.")
    registry = CollectorRegistry()
    requests_total = Counter("attnrec_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("attnrec_request_seconds", "request latency (s)", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        endpoint = _endpoint_of(request.url.path)
        if api_token and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_token}".encode()):
                requests_total.labels(endpoint, "401").inc()
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

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

    @app.get("/health")
    def health() -> dict[str, Any]:
        meta = recommender.bundle.index_meta
        return {"status": "ok", "model_version": recommender.version, "items": recommender.num_items,
                "index": meta.kind, "index_device": meta.device}

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
        try:
            answer = recommender.recommend(
                items=[str(i) for i in body.items], k=body.k, explain=body.explain, exclude_seen=body.exclude_seen,
                include_categories=body.include_categories, exclude_categories=body.exclude_categories,
                exclude_items=[str(i) for i in body.exclude_items] if body.exclude_items else None)
        except UnknownItems as exc:
            return JSONResponse({"error": str(exc), "unknown_items": exc.ids}, status_code=422)
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
    if path in {"/recommendations", "/health", "/metrics"} or path in OPEN_PATHS:
        return path
    return "other"
