"""The Python API on a real registry champion: the README's notebook example runs as written,
ids in the user's terms, unknown users and items said, never silently wrong."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import Recommender
from pipeline.data.identity import InvalidId
from pipeline.serving.recommender import UnknownItems

REPO = Path(__file__).resolve().parents[3]


def readme_python_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 3)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python example"
    return match.group(1)


def test_the_readme_example_runs_as_written(champion_home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("ATTNREC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ATTNREC_HOME", str(champion_home))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_python_example(), "README.md (Python API)", "exec"), namespace)  # noqa: S102
    lines = printed.getvalue().splitlines()
    assert len(lines) >= 5 and lines[0].split()[0].isdigit(), printed.getvalue()
    rec = namespace["rec"]
    assert isinstance(rec, Recommender) and rec.version == "attnrec v1"
    everyone = namespace["everyone"]
    assert everyone["user_id"].n_unique() == 610 and everyone.height == 610 * 50
    assert pl.concat(list(namespace["pieces"])).equals(everyone)  # type: ignore[call-overload]


def test_ids_are_the_users_and_answers_say_what_is_unknown(champion_home: Path) -> None:
    rec = Recommender.load(home=champion_home)
    by_user = rec.recommend(user="42", k=5, explain=True)
    assert by_user.known_user is True and by_user.fallback is None and by_user.history_length > 0
    assert all(r.reasons for r in by_user.recommendations)
    assert rec.recommend(user=" 42\t", k=5).recommendations == rec.recommend(user="42", k=5, explain=False).recommendations
    nobody = rec.recommend(user="²", k=5)
    assert nobody.known_user is False and nobody.fallback == "popular" and len(nobody.recommendations) == 5
    with pytest.raises(InvalidId, match="user id is empty"):
        rec.recommend(user="  ", k=5)
    with pytest.raises(UnknownItems) as caught:
        rec.recommend(items=["1", "no-such-item", "0001"], k=5)
    assert caught.value.ids == ["no-such-item", "0001"]
    adhoc = rec.recommend(items=[" 1", "260"], k=5)  # ' 1' is item 1
    assert adhoc.known_user is None and adhoc.history_length == 2
    assert not {"1", "260"} & {r.item_id for r in adhoc.recommendations}
    near = rec.similar("1", k=5).recommendations
    assert len(near) == 5 and "1" not in {r.item_id for r in near}
    scores = [r.score for r in near]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(UnknownItems):
        rec.similar("no-such-item")


def test_recommend_all_is_every_users_answer(champion_home: Path) -> None:
    rec = Recommender.load(home=champion_home, cache_histories=True)
    frame = rec.recommend_all(k=10)
    assert frame.columns == ["user_id", "rank", "item_id", "score", "fallback", "model_version"]
    for user in ("1", "42", "610"):
        rows = frame.filter(frame["user_id"] == user).sort("rank")
        assert rows["item_id"].to_list() == [r.item_id for r in rec.recommend(user=user, k=10).recommendations]
        np.testing.assert_allclose(rows["score"].to_numpy(), [r.score for r in rec.recommend(user=user, k=10).recommendations],
                                   atol=1e-4)


def test_item_facts_title_search_and_a_timeline_for_the_web_page(champion_home: Path) -> None:
    from datetime import UTC, datetime

    rec = Recommender.load(home=champion_home)
    toy = rec.item(" 1 ")  # the identity rule, as everywhere
    assert toy.item_id == "1" and toy.title == "Toy Story (1995)" and "Animation" in toy.categories
    assert toy.popularity > 100 and 1 <= toy.popularity_rank <= 20
    found = rec.search("  star WARS ", limit=5)
    assert len(found) == 5 and all("star wars" in (i.title or "").lower() for i in found)
    assert [i.popularity for i in found] == sorted((i.popularity for i in found), reverse=True)
    assert rec.search("260", limit=3)[0].item_id == "260"  # an id comes first
    assert rec.search("no title has this", limit=5) == [] and rec.search("   ", limit=5) == []
    with pytest.raises(UnknownItems):
        rec.item("no-such-item")
    events = rec.timeline("42")
    assert events is not None and len(events) == 440
    assert [e.item_id for e in events][-1] == "2987" and rec.timeline("no-such-user") is None
    assert events[0].at == datetime.fromtimestamp(996212624, tz=UTC)  # ratings.csv's first time of user 42
    assert all(a.at <= b.at for a, b in zip(events, events[1:]))
    assert rec.bundle.indices_of_keys(np.array([e.item_key for e in events])).tolist() == \
        rec.bundle.indices_of_keys(rec.histories.history("42")).tolist()  # the order the model reads
