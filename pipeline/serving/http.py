"""HTTP API (FastAPI): recommendations with reasons, similar items, health, readiness and metrics.

    GET  /users/{user_id}/recommendations?k=10&explain=false
    POST /recommendations            {"items": [ids, oldest first], "k": 10, "explain": false}
    GET  /items/{item_id}/similar?k=10
    GET  /items/search?q=star+wars&limit=20   items by title (or id), the most popular first
    GET  /health (alive), GET /ready (model and histories loaded), GET /metrics (Prometheus text),
    GET  /docs, /redoc (OpenAPI, offline: the assets ship with fastapi-offline), GET /openapi.json

The server is a thin shell over the Python API (``Recommender``), hence over the one query
path. Bad requests get a 4xx with ``{"error": message}``, never a 5xx; an unknown user gets
a 404 whose body still carries the most popular items (``"fallback": "popular"``). Limits
(``serve`` settings): a body over ``max_body_bytes`` is a 413 (counted as it arrives, so a
huge body is never read whole), a history over ``max_history_items`` ids a 422, and a 422 for
unknown ids lists at most ``max_unknown_ids_shown`` of them with their count. While the
warehouse's histories cannot be read (an ingest holds it at start-up) the server is not
ready: ``/ready`` and every user's recommendations answer 503 with the reason; ad-hoc
histories are still answered. Every response, 5xx included, is counted in ``/metrics``.
The schema documents every answer the server gives, errors included, and the bearer scheme
(a schemathesis run holds the live server to it). When an API token is set (``ATTNREC_SERVE__API_TOKEN`` or ``ATTNREC_API_TOKEN``), every
endpoint except ``/health``, ``/ready`` and the docs needs ``Authorization: Bearer <token>``,
or the cookie the web page's token form sets (``pipeline.serving.web``: the pages at ``/`` and
``/ui/...``, outside the schema, send a browser without it to that form instead of a 401).
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from importlib.metadata import version
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio.to_thread
import orjson
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictInt, StrictStr, StringConstraints

from pipeline.config import ServeSettings
from pipeline.data.histories import WarehouseUnavailable
from pipeline.data.identity import ID_WHITESPACE, MAX_ID_CHARS, split_list
from pipeline.errors import UserError
from pipeline.serving.query import MAX_K
from pipeline.serving.recommender import Recommender, UnknownItems
from pipeline.serving.web import (RegistryReader, add_web_pages, error_page, is_open_page, is_page, safe_next,
                                  token_of_cookie)

DOCS_ASSETS = "/docs-assets"
OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}
TAGS = [
    {"name": "recommendations", "description": "Top-k items for a warehouse user or an ad-hoc history, "
                                               "with the attention over the history as each item's reasons."},
    {"name": "items", "description": "Items near an item in the model's item space (FAISS), and items by title."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics (no token needed but for metrics)."},
]


class ReasonOut(BaseModel):
    item_id: str
    title: str | None
    weight: float = Field(..., description="share of the attention over the history (the weights of one item sum to 1)")


class RecommendationOut(BaseModel):
    item_id: str
    score: float = Field(..., description="dot product of the user state and the item vector")
    title: str | None
    reasons: list[ReasonOut] = Field([], description="the history items this one rests on (with explain=true)")


class RecommendationsOut(BaseModel):
    recommendations: list[RecommendationOut]
    fallback: str | None = Field(None, description='"popular" when there was no usable history')
    model_version: str
    history_length: int = 0
    known_user: bool | None = Field(None, description="whether the warehouse knows the user (null for an ad-hoc history)")


class ErrorOut(BaseModel):
    error: str = Field(..., description="one line that says what is wrong and, for a field, which one")


class UnknownUserOut(RecommendationsOut):
    error: str = Field(..., description="says the user is unknown; the most popular items follow")


class UnknownItemsOut(ErrorOut):
    unknown_items: list[str] = Field(..., description="the unknown ids, at most serve.max_unknown_ids_shown of them")
    unknown_count: int = Field(..., description="how many ids were unknown")


class ItemOut(BaseModel):
    item_id: str
    title: str | None
    categories: list[str]
    popularity: int = Field(..., description="training interactions")
    popularity_rank: int = Field(..., description="place among all items by popularity (1 = the most popular)")


class ItemSearchOut(BaseModel):
    items: list[ItemOut] = Field(..., description="the items whose title contains the text (any case), or whose id "
                                                  "it is (first), the most popular first")
    model_version: str


class HealthOut(BaseModel):
    status: str
    model_version: str = Field(..., description="the model serving now")
    items: int
    index: str = Field(..., description="the FAISS index kind (flat, hnsw, ivf)")
    index_device: str
    ready: bool


class ReadyOut(BaseModel):
    ready: bool
    model_version: str
    reason: str | None = Field(None, description="why not ready (null when ready)")


# An item id as the identity rule reads it: text with something besides ASCII whitespace, at most
# MAX_ID_CHARS characters, or a whole number.
ItemId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ID_CHARS,
                                                pattern="[^" + "".join(f"\\x{ord(c):02x}" for c in ID_WHITESPACE) + "]")] | StrictInt


def _number_not_text(value: Any) -> Any:
    """JSON's integers include 10.0; text and booleans are not numbers."""
    if isinstance(value, (str, bool)):
        raise ValueError("must be a whole number")
    return value


WholeNumber = Annotated[int, BeforeValidator(_number_not_text)]


class HistoryRequest(BaseModel):
    items: list[ItemId] = Field(..., description="item ids, oldest first (may be empty: most-popular); "
                                                     "at most serve.max_history_items")
    k: WholeNumber = Field(10, ge=1, le=MAX_K)
    explain: StrictBool = False
    exclude_seen: StrictBool = True
    include_categories: list[StrictStr] | None = None
    exclude_categories: list[StrictStr] | None = None
    exclude_items: list[ItemId] | None = Field(None, description="at most serve.max_history_items")


def _error(description: str, model: type[BaseModel] = ErrorOut) -> dict[str, Any]:
    return {"model": model, "description": description}


INVALID = {422: _error("a parameter is out of range or not of its type (the field is named)")}
NOT_READY = {503: _error("the warehouse's histories cannot be read now (an ingest holds it); retry after the "
                         "Retry-After seconds")}


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def create_app(recommender: Recommender, api_token: str | None = None, limits: ServeSettings | None = None,
               list_versions: RegistryReader | None = None) -> FastAPI:
    """The API and the web page over one loaded ``Recommender`` (model bundle + warehouse
    histories); ``list_versions`` lists the registry's versions for the web page's model page."""
    limits = limits or ServeSettings()
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = limits.parallel_queries
        yield

    app = FastAPIOffline(lifespan=lifespan, title="attnrec", version=version("attnrec"), openapi_tags=TAGS, static_url=DOCS_ASSETS,
                         description="Top-k recommendations from a content-aware SASRec, with the attention over "
                                     "each user's history as the reasons. Errors are `{\"error\": message}`; "
                                     f"a body over {limits.max_body_bytes:,} bytes is a 413.")
    registry = CollectorRegistry()
    requests_total = Counter("attnrec_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("attnrec_request_seconds", "request latency (s)", ["endpoint"], registry=registry,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
    app.add_middleware(Guard, token=api_token, max_body=limits.max_body_bytes, counter=requests_total, latency=latency)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error_answer(request, "; ".join(parts) or "invalid request", 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {400: "the body is not JSON in UTF-8", 404: f"no such path {request.url.path!r}"}.get(exc.status_code, exc.detail)
        return _error_answer(request, str(message), exc.status_code, exc.headers)

    @app.exception_handler(UserError)
    async def on_user_error(request: Request, exc: UserError) -> Response:
        return _error_answer(request, str(exc), 422)

    @app.exception_handler(WarehouseUnavailable)
    async def on_warehouse_unavailable(request: Request, exc: WarehouseUnavailable) -> Response:
        return _error_answer(request, str(exc), 503, {"Retry-After": "1"})

    def _error_answer(request: Request, message: str, status: int, headers: dict[str, str] | None = None) -> Response:
        """``{"error": message}`` for the API, the error page for the web page's paths."""
        if is_page(request.url.path):
            return error_page(status, message, recommender.version)
        return _json({"error": message}, status, headers)

    @app.get("/health", tags=["operations"], response_model=HealthOut)
    def health() -> Response:
        """Alive: the model and index serving now."""
        meta = recommender.bundle.index_meta
        return _json({"status": "ok", "model_version": recommender.version, "items": recommender.num_items,
                      "index": meta.kind, "index_device": meta.device, "ready": recommender.ready()[0]})

    @app.get("/ready", tags=["operations"], response_model=ReadyOut,
             responses={503: {"model": ReadyOut, "description": "not ready; `reason` says why"}})
    def ready() -> Response:
        """Ready when every query can be answered: the model is loaded and the histories can be read."""
        ok, reason = recommender.ready()
        return _json({"ready": ok, "model_version": recommender.version, "reason": reason}, 200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text: requests by endpoint and status (5xx included) and latency histograms."""
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/users/{user_id}/recommendations", tags=["recommendations"], response_model=RecommendationsOut,
             responses={404: {"model": UnknownUserOut, "description": "unknown user: the body still "
                                               "carries the most popular items"}, **INVALID, **NOT_READY})
    def user_recommendations(
        user_id: str = PathParam(..., examples=["1"], description="a user id of the warehouse"),
        k: int = Query(10, ge=1, le=MAX_K, description="how many items"),
        explain: bool = Query(False, description="attach each item's reasons (attention over the history)"),
        exclude_seen: bool = Query(True, description="leave out the items in the user's history"),
        include_categories: str | None = Query(None, description="comma-separated: only items of these categories"),
        exclude_categories: str | None = Query(None, description="comma-separated: no items of these categories"),
        exclude_items: str | None = Query(None, description="comma-separated item ids to leave out"),
    ) -> Response:
        """Top-k for a user of the warehouse, from their history as it is now."""
        answer = recommender.recommend(user=user_id, k=k, explain=explain, exclude_seen=exclude_seen,
                                       include_categories=split_list(include_categories),
                                       exclude_categories=split_list(exclude_categories), exclude_items=split_list(exclude_items))
        if answer.known_user is False:
            return _json({"error": f"unknown user {user_id!r}: not in the warehouse (the most popular items follow)",
                          **answer.as_dict()}, 404)
        return _json(answer.as_dict())

    @app.post("/recommendations", tags=["recommendations"], response_model=RecommendationsOut,
              responses={400: _error("the body is not JSON in UTF-8"), 413: _error("the body is larger than serve.max_body_bytes"),
                         422: {"model": UnknownItemsOut | ErrorOut,
                               "description": "unknown item ids (listed, with their count), a history over "
                                              "serve.max_history_items, or a field out of range"}})
    def history_recommendations(body: HistoryRequest) -> Response:
        """Top-k for an ad-hoc history (for example a session), oldest item first."""
        for field, ids in (("items", body.items), ("exclude_items", body.exclude_items or [])):
            if len(ids) > limits.max_history_items:
                return _json({"error": f"{field}: at most {limits.max_history_items:,} item ids "
                                       f"(serve.max_history_items), got {len(ids):,}"}, 422)
        try:
            answer = recommender.recommend(
                items=[str(i) for i in body.items], k=body.k, explain=body.explain, exclude_seen=body.exclude_seen,
                include_categories=body.include_categories, exclude_categories=body.exclude_categories,
                exclude_items=[str(i) for i in body.exclude_items] if body.exclude_items else None)
        except UnknownItems as exc:
            shown = exc.ids[:limits.max_unknown_ids_shown]
            return _json({"error": f"unknown item ids: {', '.join(shown)}" + (" ..." if len(exc.ids) > len(shown) else ""),
                          "unknown_items": shown, "unknown_count": len(exc.ids)}, 422)
        return _json(answer.as_dict())

    @app.get("/items/{item_id}/similar", tags=["items"], response_model=RecommendationsOut,
             responses={404: _error("unknown item id"), **INVALID})
    def similar_items(item_id: str = PathParam(..., examples=["1"], description="an item id of the catalogue"), k: int = Query(10, ge=1, le=MAX_K, description="how many items")) -> Response:
        """The k items nearest to an item in the model's item space."""
        try:
            return _json(recommender.similar(item_id, k).as_dict())
        except UnknownItems:
            return _json({"error": f"unknown item id {item_id!r}"}, 404)

    @app.get("/items/search", tags=["items"], response_model=ItemSearchOut, responses=INVALID)
    def search_items(q: str = Query(..., min_length=1, max_length=200, examples=["star wars"],
                                    description="text in the title (any case), or an item id"),
                     limit: int = Query(20, ge=1, le=MAX_K, description="how many items at most")) -> Response:
        """Items whose title contains ``q`` (or whose id is ``q``), the most popular first."""
        items = [asdict(item) for item in recommender.search(q, limit)]
        return _json({"items": items, "model_version": recommender.version})

    add_web_pages(app, recommender, list_versions, api_token)
    app.openapi = lambda: _openapi_with_bearer(app, required=api_token is not None)
    return app


def _openapi_with_bearer(app: FastAPI, required: bool) -> dict[str, Any]:
    """The generated schema plus the bearer scheme, and its 401, on every endpoint that checks
    the token (optional when no token is set)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             tags=app.openapi_tags)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "ATTNREC_API_TOKEN"}}
        for path, operations in schema["paths"].items():
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}] if required else [{"bearer": []}, {}]
                    operation["responses"]["401"] = {
                        "description": "missing or wrong bearer token (only when a token is set)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


def _endpoint_of(path: str) -> str:
    """A bounded label for metrics (no raw ids in label values)."""
    if path.startswith("/users/") and path.endswith("/recommendations"):
        return "/users/{user_id}/recommendations"
    if path.startswith("/items/") and path.endswith("/similar"):
        return "/items/{item_id}/similar"
    if path == "/items/search":
        return path
    if is_page(path):
        for prefix in ("/ui/users/", "/ui/items/", "/ui/static/"):
            if path.startswith(prefix):
                return prefix + "..."
        return path if path in {"/", "/ui/try", "/ui/model", "/ui/login", "/ui/users"} else "/ui/other"
    if path in {"/recommendations", "/metrics"} or path in OPEN_PATHS:
        return path
    if path.startswith(DOCS_ASSETS + "/"):
        return DOCS_ASSETS
    return "other"


class _BodyTooLarge(Exception):
    pass


class Guard:
    """The outermost layer of the app (pure ASGI): the bearer token (401; the web page's cookie
    counts too, and a browser without either is sent to the token form), the body limit (413,
    checked on the declared length and again on the bytes as they arrive, so a huge body is
    never read whole) and the metrics of every response, 5xx included (an exception is counted
    as the 500 the server answers)."""

    def __init__(self, app: Any, token: str | None, max_body: int, counter: Counter, latency: Histogram) -> None:
        self.app, self.token, self.max_body, self.counter, self.latency = app, token, max_body, counter, latency

    @staticmethod
    def _open(path: str) -> bool:
        """Paths anyone may load: health, readiness, the docs and their assets, the token form, the page's assets."""
        return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/") or is_open_page(path)

    def _authorised(self, headers: dict[str, str]) -> bool:
        """The bearer header, or the web page's cookie, carries the token (compared in constant time)."""
        assert self.token is not None
        bearer = hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.token}".encode())
        cookie = hmac.compare_digest((token_of_cookie(headers.get("cookie", "")) or "").encode(), self.token.encode())
        return bearer or cookie

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
            if self.token and not self._open(path) and not self._authorised(headers):
                if is_page(path):  # a browser: on to the token form, back here after it
                    target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                    await guarded_send({"type": "http.response.start", "status": 303, "headers": [
                        (b"location", f"/ui/login?{urlencode({'next': safe_next(target)})}".encode("latin-1")),
                        (b"content-length", b"0")]})
                    await guarded_send({"type": "http.response.body", "body": b""})
                else:
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
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
