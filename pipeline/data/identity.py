"""The one identity rule: how a user or item id becomes a warehouse key, and a key its id.

Ids are opaque text to the user. Every part of attnrec that turns an id into a key (ingest
of every format, the item catalogue, the feature store, the history store, the CLI, the
HTTP and Python APIs) goes through this module, so one id has one key everywhere:

1. Leading and trailing ASCII whitespace (space, tab, CR, LF, VT, FF) is no part of an id:
   ``" 42\\t"`` is ``"42"``. Every other character is kept as it is (a non-breaking space,
   ``"²"`` and ``"٤٢"`` are ordinary characters).
2. An id that is empty after that is missing; an id longer than ``MAX_ID_CHARS``
   characters is refused (ingest quarantines the row, the APIs answer 4xx).
3. An id written as a canonical decimal integer in ASCII digits below ``2**62`` (``"0"``,
   ``"42"``, the 19-digit snowflake id ``"1000000000000000000"``; not ``"042"``, ``"+42"``,
   ``"4.2e1"`` or ``"٤٢"``) is its own key. Every other id gets a dictionary key at or
   above ``2**62`` (tables ``user_dict`` / ``item_dict``), given on first ingest and never
   changed. So integer ids need no dictionary lookup on the hot ingest path.
4. A typed number (a Parquet integer or float column, a JSON number) is its integer's
   decimal text when it is a whole number: ``42``, ``42.0`` and ``"42"`` are one id (pandas
   writes integer ids with a missing value as floats), and so are ``1000000000000000000`` and
   ``"1000000000000000000"``; ``-5`` is the id ``"-5"`` (a dictionary key). A typed number
   that is not whole (``4.5``, NaN) is no id: ingest quarantines its row.

Text is never a number: ``"42.0"`` in a CSV file is the text id ``"42.0"``, not 42.

The rule is written once per engine that applies it, side by side here: Python
(``canonical_id``, ``integer_key``, ``split_list``), Polars (``id_text_expr``) and DuckDB SQL
(``id_text_sql``, ``typed_id_text_sql``, ``integer_key_sql``, ``key_sql``,
``id_of_key_sql``). ``tests/pipeline/data/test_identity.py`` holds the three engines to the
same answers.
"""

from __future__ import annotations

import math
import re

import polars as pl

from pipeline.errors import UserError

DICT_KEY_BASE = 1 << 62
MAX_ID_CHARS = 1024
ID_WHITESPACE = " \t\n\r\x0b\x0c"
INTEGER_ID = "0|[1-9][0-9]{0,18}"  # ASCII digits, no leading zero; below 2**62 is checked apart
WHOLE_NUMBER_LIMIT = 9.2e18  # typed numbers this large or larger are not read as ids (beyond int64)

_INTEGER_ID = re.compile(INTEGER_ID, re.ASCII)
_SQL_WHITESPACE = "' ' || chr(9) || chr(10) || chr(13) || chr(11) || chr(12)"


class InvalidId(UserError):
    """An id that breaks the rule: empty after stripping, longer than ``MAX_ID_CHARS``, or a
    number that is not whole."""


def canonical_id(raw: object, what: str = "id") -> str:
    """The id that ``raw`` (text, or a typed number) denotes (rules 1, 2 and 4).

    Raises ``InvalidId`` naming ``what``.
    """
    if isinstance(raw, float):
        if not math.isfinite(raw) or not raw.is_integer() or abs(raw) >= WHOLE_NUMBER_LIMIT:
            raise InvalidId(f"{what} {raw!r} is a number that is not a whole number")
        raw = int(raw)
    text = str(raw).strip(ID_WHITESPACE)
    if not text:
        raise InvalidId(f"{what} is empty")
    if len(text) > MAX_ID_CHARS:
        raise InvalidId(f"{what} is longer than {MAX_ID_CHARS:,} characters ({len(text):,})")
    return text


def integer_key(id_text: str) -> int | None:
    """The key of a canonical id that is its own key (rule 3), else None (a dictionary id)."""
    if _INTEGER_ID.fullmatch(id_text) is None:
        return None
    value = int(id_text)
    return value if value < DICT_KEY_BASE else None


def split_list(text: str | None) -> list[str] | None:
    """A comma-separated list as given on a command line or in a query string (ids, categories):
    its non-blank parts without surrounding ASCII whitespace (rule 1); None for no list."""
    if not text:
        return None
    parts = [p.strip(ID_WHITESPACE) for p in text.split(",")]
    return [p for p in parts if p] or None


# --- the same rule in Polars -----------------------------------------------------------


def id_text_expr(value: pl.Expr, dtype: pl.DataType = pl.String) -> pl.Expr:
    """Polars: the canonical id text of ``value`` of type ``dtype``, null when missing or when
    a typed number is not whole (rules 1, 4; ``not_whole_expr`` tells the two apart)."""
    if dtype.is_float():
        whole = value.is_finite() & (value == value.floor()) & (value.abs() < WHOLE_NUMBER_LIMIT)
        return pl.when(whole).then(value.cast(pl.Int64).cast(pl.String))
    text = value.cast(pl.String).str.strip_chars(ID_WHITESPACE)
    return pl.when(text != "").then(text)


def not_whole_expr(value: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Polars: true where a typed number is present but not whole (no id, rule 4)."""
    if not dtype.is_float():
        return pl.lit(False)
    return value.is_not_null() & ~(value.is_finite() & (value == value.floor()) & (value.abs() < WHOLE_NUMBER_LIMIT))


# --- the same rule in DuckDB SQL -------------------------------------------------------


def id_text_sql(column: str) -> str:
    """SQL: the canonical id text of a text column, NULL when missing (rule 1)."""
    return f"nullif(trim({column}::VARCHAR, {_SQL_WHITESPACE}), '')"


def typed_id_text_sql(column: str) -> str:
    """SQL: the canonical id text of a typed number column (rule 4): the whole number's decimal
    text, NULL when missing or not whole (``not_whole_sql`` tells the two apart)."""
    whole = f"isfinite({column}::DOUBLE) AND {column} = trunc({column}) AND abs({column}::DOUBLE) < {WHOLE_NUMBER_LIMIT}"
    return f"CASE WHEN {whole} THEN {column}::HUGEINT::VARCHAR END"


def not_whole_sql(column: str) -> str:
    """SQL: true where a typed number is present but not whole (no id, rule 4)."""
    return f"({column} IS NOT NULL AND {typed_id_text_sql(column)} IS NULL)"


def too_long_sql(id_text: str) -> str:
    """SQL: true when the canonical id ``id_text`` is longer than the rule allows."""
    return f"length({id_text}) > {MAX_ID_CHARS}"


def integer_key_sql(id_text: str) -> str:
    """SQL: the key of canonical id text ``id_text`` when it is its own key, else NULL (rule 3)."""
    return (f"CASE WHEN regexp_full_match({id_text}, '{INTEGER_ID}') "
            f"AND TRY_CAST({id_text} AS BIGINT) < {DICT_KEY_BASE} THEN TRY_CAST({id_text} AS BIGINT) END")


def integer_column_key_sql(column: str) -> str:
    """SQL: the key of a typed integer column's value when it is its own key, else NULL (rules 3, 4)."""
    return f"CASE WHEN {column} >= 0 AND {column} < {DICT_KEY_BASE} THEN {column}::BIGINT END"


def key_sql(id_text: str, dict_alias: str, kind: str) -> str:
    """SQL: the key of canonical id text ``id_text``; needs ``{kind}_dict`` joined as ``dict_alias``
    on ``{dict_alias}.{kind}_id = id_text``."""
    return f"coalesce({integer_key_sql(id_text)}, {dict_alias}.{kind}_key)"


def id_of_key_sql(key: str, dict_alias: str, kind: str) -> str:
    """SQL: the id of key ``key`` (the inverse of the rule); needs ``{kind}_dict`` joined as
    ``dict_alias`` on ``{dict_alias}.{kind}_key = key``."""
    return f"CASE WHEN {key} < {DICT_KEY_BASE} THEN {key}::VARCHAR ELSE {dict_alias}.{kind}_id END"
