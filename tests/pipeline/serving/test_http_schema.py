"""The live server against its own OpenAPI schema (schemathesis): generated requests, valid and
invalid, get zero 5xx and only the statuses, headers and bodies the schema documents."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.pipeline.serving.test_http import Server
from tests.support import Attnrec

TOKEN = "schema-test-token"


@pytest.fixture(scope="module")
def guarded(small_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(Attnrec(small_home, tmp_path_factory.mktemp("schema")), token=TOKEN,
                 env={"ATTNREC_SERVE__MAX_BODY_BYTES": "20000", "ATTNREC_SERVE__MAX_HISTORY_ITEMS": "200"})
    yield srv
    srv.stop()


def test_the_schema_documents_errors_tags_and_the_bearer_scheme(guarded: Server) -> None:
    spec = httpx.get(guarded.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                              "description": "ATTNREC_API_TOKEN"}
    users = spec["paths"]["/users/{user_id}/recommendations"]["get"]
    assert users["security"] == [{"bearer": []}] and users["tags"] == ["recommendations"] and users["description"]
    assert {"200", "401", "404", "422", "503"} <= set(users["responses"])
    assert users["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/UnknownUserOut")
    post = spec["paths"]["/recommendations"]["post"]
    assert {"200", "401", "413", "422"} <= set(post["responses"])
    assert "security" not in spec["paths"]["/health"]["get"]
    assert {t["name"] for t in spec["tags"]} == {"recommendations", "items", "operations"}


def test_docs_work_offline_with_their_assets_served_by_the_server(guarded: Server) -> None:
    page = httpx.get(guarded.url + "/docs").text
    assert "cdn." not in page and "https://" not in page.split("<body>")[0]
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page
        got = httpx.get(guarded.url + asset)  # no token needed for the docs
        assert got.status_code == 200 and len(got.content) > 100_000
    assert "/docs-assets/redoc.standalone.js" in httpx.get(guarded.url + "/redoc").text


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(guarded: Server, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run(
        [str(schemathesis), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run", guarded.url + "/openapi.json", "--checks", "all",
         "--exclude-checks", "ignored_auth,use_after_free,ensure_resource_availability,object_level_authorization",
         "--header", f"Authorization: Bearer {TOKEN}", "--phases", "examples,coverage,fuzzing",
         "--max-examples", "200", "--seed", "7", "--workers", "1", "--request-timeout", "20",
         "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # its .schemathesis cache goes there, not in the checkout
        env={"SCHEMATHESIS_HOOKS": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    summary = done.stdout[-6000:]
    assert done.returncode == 0, summary
    assert "passed" in summary.lower()
