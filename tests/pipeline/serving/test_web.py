"""The web page served for real: ``attnrec serve`` on ml-latest-small with a trained champion and a
challenger, a catalogue title that is markup, a token; driven by a real headless Chromium
(Debian's ``chromium`` through Playwright) and by plain HTTP requests.

The browser test takes a 1,280 px screenshot of each page; with ``ATTNREC_UPDATE_SCREENSHOTS=1``
it writes them over the README's (``docs/screenshots/*.png``).
``make test`` installs Chromium where it is missing; here a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.app.steps import train
from pipeline.config import load_settings
from pipeline.data.catalog import ingest_items
from pipeline.data.feature_store import build_feature_set
from pipeline.data.warehouse import connect
from tests.pipeline.conftest import TINY_TRAINING
from tests.pipeline.serving.test_http import Server
from tests.support import CHROMIUM, CHROMIUM_ARGS, Attnrec

TOKEN = "web-test-token"
MARKUP = "<script>alert(1)</script>"
MARKUP_ITEM = "2987"  # the newest item of user 42's history, so the markup title is on their page and in reasons
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[3] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def web_home(champion_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``champion_home`` (v1) whose catalogue then got a title that is markup, and a second tiny
    model (v2) trained on it through ``attnrec train``'s step, so the registry has two versions
    and a gate decision between them."""
    home = tmp_path_factory.mktemp("web") / "home"
    shutil.copytree(champion_home, home)
    titles = home.parent / "markup-title.csv"
    titles.write_text(f"movieId,title\n{MARKUP_ITEM},{MARKUP}\n")
    settings = load_settings(home=home, **TINY_TRAINING)
    con = connect(settings.duckdb_path)
    try:
        ingest_items(con, titles)
        build_feature_set(con, settings)
    finally:
        con.close()
    assert train(settings, baselines=False)["version"] == "2"
    return home


@pytest.fixture(scope="module")
def server(web_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``attnrec serve`` over the registry's champion, with a token."""
    srv = Server(Attnrec(web_home, tmp_path_factory.mktemp("web-serve")), token=TOKEN, model=None)
    yield srv
    srv.stop()


def screenshot(page: Any, name: str, folder: Path) -> None:
    """The page as the README shows it: a 1,280 px wide PNG, reduced to a 64-colour palette to stay small."""
    from PIL import Image

    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    Image.open(path).quantize(64).save(path, optimize=True)


def login(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/ui/login", data={"token": TOKEN, "next": "/"}).status_code == 303
    return client


def test_pages_need_the_token_and_the_form_sets_a_cookie_the_api_accepts_too(server: Server) -> None:
    page = httpx.get(server.url + "/ui/users/42?k=3")
    assert page.status_code == 303 and page.headers["location"] == "/ui/login?next=%2Fui%2Fusers%2F42%3Fk%3D3"
    assert httpx.get(server.url + "/items/search?q=star").status_code == 401  # the API still answers JSON 401s
    form = httpx.get(server.url + "/ui/login?next=/ui/model")
    assert form.status_code == 200 and 'type="password"' in form.text
    assert httpx.get(server.url + "/ui/static/web.css").status_code == 200  # assets need no token
    wrong = httpx.post(server.url + "/ui/login", data={"token": "nope", "next": "/"})
    assert wrong.status_code == 401 and "not the token" in wrong.text and "set-cookie" not in wrong.headers
    away = httpx.post(server.url + "/ui/login", data={"token": TOKEN, "next": "https://elsewhere.example/"})
    assert away.headers["location"] == "/"  # never sent to another site
    cookie = away.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    client = login(server.url)
    assert client.get("/ui/users/42").status_code == 200
    assert client.get("/items/search", params={"q": "star"}).status_code == 200


def test_item_search_is_in_the_api_and_its_schema(server: Server) -> None:
    client = login(server.url)
    body = client.get("/items/search", params={"q": "STAR WARS", "limit": 3}).json()
    assert len(body["items"]) == 3 and body["model_version"] == "attnrec v2"
    assert all("star wars" in item["title"].lower() for item in body["items"])
    assert [i["popularity"] for i in body["items"]] == sorted((i["popularity"] for i in body["items"]), reverse=True)
    assert client.get("/items/search", params={"q": "1"}).json()["items"][0]["item_id"] == "1"  # an id first
    for params in ({"q": ""}, {"q": "x" * 201}, {"q": "star", "limit": 0}, {}):
        bad = client.get("/items/search", params=params)
        assert bad.status_code == 422 and bad.json()["error"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/items/search" in spec["paths"] and not any(p == "/" or p.startswith("/ui") for p in spec["paths"])


def test_titles_and_ids_are_escaped_everywhere(server: Server) -> None:
    client = login(server.url)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path in ("/ui/users/42", f"/ui/items/{MARKUP_ITEM}", "/ui/try?q=alert", f"/ui/try?items={MARKUP_ITEM}"):
        page = client.get(path)
        assert page.status_code == 200 and escaped in page.text and MARKUP not in page.text, path
    hostile_id = client.get("/ui/users/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert hostile_id.status_code == 404 and "<img" not in hostile_id.text and "&lt;img src=x" in hostile_id.text


@pytest.mark.parametrize("path,status,message", [
    ("/ui/users/42?k=abc", 422, "k must be a whole number"),
    ("/ui/users/42?k=%C2%B2", 422, "k must be a whole number"),
    ("/ui/try?k=" + "9" * 5000, 422, "k must be a whole number"),
    ("/ui/users/42?include_categories=Comdy", 422, "did you mean Comedy"),
    ("/ui/users/42?exclude_items=" + "9" * 300, 422, "longer than 200"),
    ("/ui/items/no-such-item", 404, "unknown item ids: no-such-item"),
    ("/ui/try?items=1,zzz", 404, "unknown item ids: zzz"),
    ("/ui/users", 422, "type a user id"),
    ("/ui/no-such-page", 404, "no such path"),
])
def test_bad_input_gets_an_html_page_that_says_what_is_wrong(server: Server, path: str, status: int, message: str) -> None:
    page = login(server.url).get(path)
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")
    assert message in page.text.replace("&#39;", "'") and "Traceback" not in page.text


def test_pages_load_nothing_from_elsewhere_and_weigh_little(server: Server) -> None:
    client = login(server.url)
    page = client.get("/ui/users/42")
    assets = re.findall(r'(?:src|<link[^>]*href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/ui/static/") for a in assets), assets
    weight = len(page.content) + sum(len(client.get(a).content) for a in assets)
    assert weight < 200_000, weight
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_a_person_uses_the_pages_in_chromium(server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install -y chromium), "
                    "or set CHROMIUM to a Chromium binary", pytrace=False)
    # the README's pictures when asked (ATTNREC_UPDATE_SCREENSHOTS=1), else beside the test: a run leaves the checkout clean
    shots = DOCS_SCREENSHOTS if os.environ.get("ATTNREC_UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.set_default_timeout(20_000)

            # The token form, then the start page, all from the keyboard.
            page.goto(server.url + "/")
            page.fill("#token", TOKEN)
            page.keyboard.press("Enter")
            page.wait_for_url(server.url + "/")
            for _ in range(12):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "user":
                    break
            assert page.evaluate("document.activeElement.id") == "user", "the user search is not reachable by Tab"
            page.keyboard.type("42")
            page.keyboard.press("Enter")
            page.wait_for_url(server.url + "/ui/users/42")

            # The user page: k recommendations, each with reason bars; the markup title is text.
            recs = page.locator("ol.recs > li.rec")
            expect(recs).to_have_count(10)
            for i in range(10):
                bars = recs.nth(i).locator(".reasons .bar")
                assert bars.count() >= 1
                assert bars.first.bounding_box()["width"] > 0
            expect(page.locator(".timeline li").first).to_contain_text(MARKUP)
            assert page.evaluate("document.querySelectorAll('main script').length") == 0
            expect(page.locator(".serving")).to_contain_text("attnrec v2")
            screenshot(page, "user", shots)

            # Follow a reason to its item page.
            reason = recs.first.locator(".reasons a").first
            title = reason.locator(".reason-text").inner_text()
            reason.click()
            page.wait_for_url(re.compile(r".*/ui/items/.+"))
            expect(page.locator("h1")).to_have_text(title)
            expect(page.locator("#similar-h + ol.recs > li")).to_have_count(10)
            screenshot(page, "item", shots)

            # Try a history: search as you type, add three items (the third from the keyboard); the list changes each time.
            page.goto(server.url + "/ui/try")
            shown: list[list[str]] = [page.locator("ol.recs .rec-title").all_inner_texts()]
            page.fill("#q", "star wars")
            expect(page.locator(".found li")).not_to_have_count(0)
            for step in range(3):
                add = page.locator(".found .add").nth(step)
                if step == 2:
                    add.focus()
                    page.keyboard.press("Enter")
                else:
                    add.click()
                expect(page.locator(".timeline.oldest-first li")).to_have_count(step + 1)
                shown.append(page.locator("ol.recs .rec-title").all_inner_texts())
                assert shown[-1] != shown[-2], f"the recommendations did not change after adding item {step + 1}"
            assert page.evaluate("document.activeElement.id") == "q"  # the keyboard stays where the search is
            assert "items=" in page.url  # the history is in the address: a reload or a shared link shows it
            expect(page.locator("ol.recs > li.rec .reasons").first).to_be_visible()
            screenshot(page, "try", shots)
            page.fill("#q", "alert")
            expect(page.locator(".found li").first).to_contain_text(MARKUP)

            # The model page: both versions, the gate's decisions, links to their MLflow runs.
            page.goto(server.url + "/ui/model")
            rows = page.locator("table.versions tbody tr")
            expect(rows).to_have_count(2)
            expect(page.locator("table.versions")).to_contain_text("champion")
            assert all("/#/experiments/" in (link.get_attribute("href") or "")
                       for link in page.locator("table.versions a").all())
            screenshot(page, "model", shots)

            # Phone width: nothing wider than the screen.
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.context.add_cookies([{"name": "attnrec_token", "value": TOKEN, "url": server.url}])
            for path in ("/ui/users/42", "/ui/try?items=1,260,1196&q=star", "/ui/items/1", "/ui/model"):
                phone.goto(server.url + path)
                assert phone.evaluate("document.documentElement.scrollWidth") <= 390, path
        finally:
            browser.close()
    assert dialogs == [], f"a page ran a script from the data: {dialogs}"
