"""The web page for people, served by ``attnrec serve`` beside the API from the same process.

    GET /                         search a user or an item; links to the other pages
    GET /ui/users/{user_id}       the user's history (timeline), top-k with reasons drawn as bars,
                                  filters (k, categories, excluded items), the model serving
    GET /ui/try?items=1,260&q=    try a history: search titles, add and remove items, watch the
                                  recommendations and their reasons change
    GET /ui/items/{item_id}       title, categories, popularity, similar items (FAISS)
    GET /ui/model                 the registry's versions: champion, challengers, gate decisions,
                                  metrics and links to their MLflow runs
    GET/POST /ui/login            the token form (when a token is set); sets an HttpOnly cookie

Pages are rendered on the server from Jinja templates with autoescaping (every title and id
is text, never markup) and go through the same ``Recommender`` as the API: there is no
second scoring path. The assets (one stylesheet, one small script that swaps a page's
``#swap`` region in place instead of reloading it) ship in ``pipeline/serving/web/``; nothing
is fetched from elsewhere, and every page works without the script. Bad input renders an
error page with the message and a 4xx status, never a traceback.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from pipeline.data.histories import WarehouseUnavailable
from pipeline.data.identity import split_list
from pipeline.errors import UserError
from pipeline.registry.tracking import RegisteredVersion
from pipeline.serving.query import MAX_K, ItemInfo, Recommendations
from pipeline.serving.recommender import Recommender, UnknownItems

WEB_DIR = Path(__file__).with_name("web")
STATIC_PATH = "/ui/static"
LOGIN_PATH = "/ui/login"
TOKEN_COOKIE = "attnrec_token"
TIMELINE_ITEMS = 50  # history items listed on a user page, newest first (the count of the others is given)
SEARCH_RESULTS = 20
SIMILAR_ITEMS = 10
MAX_TRY_ITEMS = 200  # items in a tried history (the URL carries them)
MAX_QUERY_CHARS = 200
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

RegistryReader = Callable[[], list[RegisteredVersion]]


def is_page(path: str) -> bool:
    """Whether ``path`` is one of the web page's (HTML answers, the token form instead of a 401)."""
    return path == "/" or path == "/ui" or path.startswith("/ui/")


def is_open_page(path: str) -> bool:
    """The web paths a browser may load without the token: the login form and the assets."""
    return path == LOGIN_PATH or path.startswith(STATIC_PATH + "/")


def token_of_cookie(cookie_header: str) -> str | None:
    """The token the login form stored in the browser's cookie, if any."""
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            return value
    return None


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this server only (never another site)."""
    return target if target and target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB_DIR / "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_templates.globals.update(path_part=lambda text: quote(str(text), safe=""), static=STATIC_PATH, max_k=MAX_K)


def render(template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(template).render(**context), status_code=http_status, headers=SECURITY_HEADERS)


def error_page(status: int, message: str, version: str | None = None) -> HTMLResponse:
    """The page every bad request of the web page gets: the message, and a way back."""
    return render("error.html", status, message=message, status=status, version=version)


@dataclass
class TryState:
    """The try-a-history page's state, all of it in its URL: the history (item ids, oldest
    first), the title search and k."""

    items: list[str]
    q: str
    k: int

    def url(self, items: list[str]) -> str:
        """This page's address with the history ``items`` instead (the search and k kept)."""
        params = {"items": ",".join(items), "q": self.q, "k": self.k}
        return "/ui/try?" + urlencode({k: v for k, v in params.items() if v != ""})


def _k_of(text: str | None) -> int:
    """k from a form field: a whole number in 1..MAX_K (a UserError says otherwise)."""
    value = (text or "").strip()
    if not value:
        return 10
    if not (value.isdecimal() and len(value) <= len(str(MAX_K)) and 1 <= int(value) <= MAX_K):
        raise UserError(f"k must be a whole number between 1 and {MAX_K}, got {value[:40]!r}")
    return int(value)


def _bounded(text: str | None, what: str) -> str:
    text = text or ""
    if len(text) > MAX_QUERY_CHARS:
        raise UserError(f"{what} is longer than {MAX_QUERY_CHARS} characters ({len(text):,})")
    return text


def add_web_pages(app: FastAPI, recommender: Recommender, list_versions: RegistryReader | None, token: str | None) -> None:
    """Add the pages, the login form and the assets to the API's ``app``."""
    app.mount(STATIC_PATH, StaticFiles(directory=WEB_DIR / "static"), name="web-static")

    def page(build: Callable[[], HTMLResponse]) -> HTMLResponse:
        """``build``'s page, or the error page for what a person can fix (unknown ids, bad filters)."""
        try:
            return build()
        except UnknownItems as exc:
            return error_page(404, str(exc), recommender.version)
        except WarehouseUnavailable as exc:
            return error_page(503, str(exc), recommender.version)
        except UserError as exc:
            return error_page(422, str(exc), recommender.version)

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return render("home.html", version=recommender.version, items=recommender.num_items)

    @app.get("/ui/users", include_in_schema=False)
    def find_user(user: str = "") -> Response:
        """The home page's search box: on to the user's page."""
        if not user.strip():
            return error_page(422, "type a user id to look up", recommender.version)
        return RedirectResponse(f"/ui/users/{quote(user.strip(), safe='')}", status_code=303)

    @app.get("/ui/users/{user_id}", include_in_schema=False)
    def user_page(user_id: str, k: str | None = None, include_categories: str | None = None,
                  exclude_categories: str | None = None, exclude_items: str | None = None) -> HTMLResponse:
        def build() -> HTMLResponse:
            filters = {"include_categories": split_list(_bounded(include_categories, "include_categories")),
                       "exclude_categories": split_list(_bounded(exclude_categories, "exclude_categories")),
                       "exclude_items": split_list(_bounded(exclude_items, "exclude_items"))}
            answer = recommender.recommend(user=user_id, k=_k_of(k), explain=True, **filters)
            events = recommender.timeline(user_id) if answer.known_user else None
            newest = list(reversed(events[-TIMELINE_ITEMS:])) if events else []
            shown = [(event, _item_or_none(recommender, event.item_id)) for event in newest]
            return render("user.html", 200 if answer.known_user else 404, user_id=user_id, answer=answer,
                          timeline=shown, history_total=len(events or []), read=recommender.bundle.model.max_len,
                          k=_k_of(k), form={"include_categories": include_categories or "",
                                            "exclude_categories": exclude_categories or "", "exclude_items": exclude_items or ""},
                          categories=recommender.bundle.category_names(), version=answer.model_version)
        return page(build)

    @app.get("/ui/try", include_in_schema=False)
    def try_page(items: str | None = None, q: str | None = None, k: str | None = None) -> HTMLResponse:
        def build() -> HTMLResponse:
            state = TryState(split_list(items) or [], _bounded(q, "the search"), _k_of(k))
            if len(state.items) > MAX_TRY_ITEMS:
                raise UserError(f"a tried history holds at most {MAX_TRY_ITEMS} items, got {len(state.items)}")
            history = [recommender.item(i) for i in state.items]  # UnknownItems names a wrong id
            answer: Recommendations = recommender.recommend(items=state.items, k=state.k, explain=True)
            found = recommender.search(state.q, SEARCH_RESULTS) if state.q.strip() else []
            return render("try.html", state=state, history=history, answer=answer, found=found,
                          version=answer.model_version)
        return page(build)

    @app.get("/ui/items/{item_id}", include_in_schema=False)
    def item_page(item_id: str) -> HTMLResponse:
        def build() -> HTMLResponse:
            item = recommender.item(item_id)
            return render("item.html", item=item, similar=recommender.similar(item_id, SIMILAR_ITEMS),
                          items=recommender.num_items, version=recommender.version)
        return page(build)

    @app.get("/ui/model", include_in_schema=False)
    def model_page() -> HTMLResponse:
        def build() -> HTMLResponse:
            versions, problem = [], None
            if list_versions is None:
                problem = "this server was started without a model registry"
            else:
                try:
                    versions = list_versions()
                except UserError as exc:
                    problem = str(exc)
            meta = recommender.bundle.index_meta
            return render("model.html", versions=versions, problem=problem, version=recommender.version,
                          items=recommender.num_items, index=meta)
        return page(build)

    @app.get(LOGIN_PATH, include_in_schema=False)
    def login_form(next: str | None = None) -> Response:
        if token is None:
            return RedirectResponse(safe_next(next), status_code=303)
        return render("login.html", next=safe_next(next), wrong=False, version=None)

    @app.post(LOGIN_PATH, include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        given, target = (fields.get("token") or [""])[0], safe_next((fields.get("next") or ["/"])[0])
        if token is None:
            return RedirectResponse(target, status_code=303)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return render("login.html", 401, next=target, wrong=True, version=None)
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return answer


def _item_or_none(recommender: Recommender, item_id: str) -> ItemInfo | None:
    """The catalogue facts of a history item, or None for an item the model does not know."""
    try:
        return recommender.item(item_id)
    except UnknownItems:
        return None
