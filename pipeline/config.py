"""The one typed settings object of attnrec.

Sources, lowest to highest priority: built-in defaults, ``attnrec.toml`` (in the working
directory, or the file named by ``ATTNREC_CONFIG``), ``ATTNREC_*`` environment variables
(nested fields with ``__``: ``ATTNREC_TRAIN__EPOCHS=5``), and explicit overrides (CLI flags).

Everything attnrec writes lives under one state folder, ``home`` (``$ATTNREC_HOME``, by
default ``./.attnrec``): the DuckDB warehouse, feature sets, checkpoints, the MLflow store,
Prefect's local database and FAISS indexes. Each embedded service can instead point at a
real server by setting (``mlflow_tracking_uri``, ``prefect_api_url``, ``duckdb_path``).
"""

from __future__ import annotations

import difflib
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.errors import UserError

CONFIG_FILE_NAME = "attnrec.toml"
# Environment variables attnrec reads beside the settings' own ATTNREC_* names.
OTHER_ENV = {"ATTNREC_CONFIG", "ATTNREC_API_TOKEN"}

# Choices typed once for the CLI, the flows and the settings.
IndexKind = Literal["auto", "flat", "hnsw", "ivf"]
EvalSplit = Literal["valid", "test"]
Baseline = Literal["popularity", "itemknn"]
TextEncoder = Literal["hashed", "minilm", "none"]
Engine = Literal["local", "ray"]


class Section(BaseModel):
    """A group of settings; a key it does not have is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    """Shape of the content-aware SASRec model."""

    hidden_size: int = Field(128, ge=4, description="item / state vector size D (64 learned more slowly on Amazon Toys: "
                             "docs/benchmarks.md)")
    num_blocks: int = Field(2, ge=1, description="self-attention blocks")
    num_heads: int = Field(1, ge=1, description="attention heads per block")
    max_len: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        "auto", description="history length T the encoder reads; auto: the 99th percentile of the training "
                            "histories, rounded up to 25, at most 200 (pipeline/training/data_defaults.py)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = Field(
        "auto", description="auto: 0.5 for short histories (median under 20 items), else 0.2")
    ff_mult: int = Field(1, ge=1, description="feed-forward hidden size = ff_mult x hidden_size")
    use_content: bool = Field(True, description="mix content features into the item tower")
    text_encoder: TextEncoder = Field(
        "hashed", description="how the item tower reads item text: hashed words and word pairs (trained "
                              "embeddings), minilm (frozen all-MiniLM-L6-v2 sentence vectors, projected) or none")
    id_dropout: float = Field(
        0.1, ge=0.0, le=1.0,
        description="share of item-ID embeddings hidden per step so content alone learns to stand in",
    )


class TrainSettings(Section):
    """Training loop settings.

    The defaults are the full-softmax SASRec+ recipe, a training window's own items left out of
    its negatives; the ``auto`` values are fitted to the feature set's histories
    (``pipeline/training/data_defaults.py``): for long histories an 80-epoch cosine at 1e-3,
    the configuration of the ML-1M benchmark run in docs/benchmarks.md (test NDCG@10 0.1966).
    """

    epochs: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="maximum epochs; also the length of the cosine schedule; auto: 80, or "
                            "10 for short histories (median under 20 items)")
    batch_size: int = Field(128, ge=1)
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="peak learning rate (AdamW); auto: 1e-3, or 3e-3 for short histories")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    negatives: int = Field(0, ge=0, description="0 = full softmax; N = sampled softmax with logQ correction")
    exclude_history: bool = Field(True, description="items of a training window are never negatives at its positions (ranking excludes seen items)")
    sparse_item_tables: bool = Field(
        True, description="sampled softmax with workers > 1: the item tables' gradients keep only the rows a step looked up, "
                          "and the workers exchange those rows alone (false: DDP all-reduces the whole tables every step; "
                          "never in a compiled step, which cannot compile a sparse backward)")
    table_updates: Literal["dense", "rows"] = Field(
        "dense", description="how AdamW updates the item tables (IDs, categories, hashed words) under a sampled softmax: "
                             "dense: every row every step; rows: only the rows the step looked up, each first given "
                             "the steps it missed in closed form (AdamW's weights whenever a row is read and at "
                             "every validation), much less memory traffic at large catalogues (docs/scaling.md); "
                             "needs train.negatives > 0 and an uncompiled step")
    patience: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="epochs without a gain of the selection metric before stopping; auto: 5 for short "
                            "histories (median under 20 items), else 20")
    eval_every: int = Field(1, ge=1, description="validate every N epochs")
    valid_users: int | None = Field(
        None, ge=1, description="validation ranks a fixed random sample of this many of the users with a validation "
                                "target (for the best epoch, early stopping and the promotion gate alike; the cost of a "
                                "full ranking grows with users x items); unset: every such user")
    test_users: int | None = Field(
        None, ge=1, description="the test report after training (this run, the champion and the baselines side by side) "
                                "ranks a fixed random sample of this many of the users with a test target, the same "
                                "users for every row; unset: every such user")
    selection_metric: str = Field(
        "ndcg@10", pattern=r"^(hr|ndcg|mrr)@[1-9][0-9]*$",
        description="validation metric that picks the best epoch, stops early and gates promotion (hr|ndcg|mrr@K)")
    seed: int = 42
    all_windows: bool = Field(True, description="long histories give all their windows of max_len, not only the newest")
    group_by_length: bool = Field(False, description="batches of windows of similar length: less padding, faster steps, lower quality on ML-100K (docs/benchmarks.md)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU")
    compile: Literal["auto", "on", "off"] = Field(
        "off", description="torch.compile the training step (auto: on CUDA only). Off by default: on an H200 it took 32 s "
                           "of compilation to save 0.25 s per ML-1M epoch, about 130 epochs to pay back "
                           "(docs/benchmarks.md, Training on a GPU)")
    workers: int = Field(1, ge=1, description="training processes (torch DDP run by Ray Train on the engine's cluster, "
                                              "each a share of every batch); 1: this process")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: object) -> object:
        """Settings written when ``compile`` was a bool ("compile on CUDA") keep their meaning."""
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value


class FeatureSettings(Section):
    """How the feature set is cut out of the warehouse."""

    split: Literal["loo", "temporal"] = "loo"
    split_time: datetime | None = Field(None, description="temporal split: test events at/after this time")
    valid_time: datetime | None = Field(None, description="temporal split: validation events at/after this time")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="temporal split without split_time: last share of events")
    min_user_events: int = Field(1, ge=1)
    text_buckets: int = Field(1 << 15, ge=16, description="hashed text-token buckets")
    max_text_tokens: int = Field(32, ge=1)
    max_categories: int = Field(8, ge=1)
    cold_item_fraction: float = Field(0.0, ge=0, lt=1, description="share of items held out of training for the cold-start report")
    event_types: list[str] | None = Field(None, description="only these event types (None: all)")


class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: str | None = Field(None, description="bearer token required by the HTTP API when set")
    threads: int = Field(1, ge=1, description="torch / FAISS threads per query (queries already run in parallel)")
    parallel_queries: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                                  description="queries answered at once (the others wait in order); default: the CPU count")
    follow_model_s: float = Field(10.0, ge=0, description="how often the server checks its registry alias (the champion) "
                                  "for a new model or a rebuilt index, swapped in without a restart; 0: never")
    keep_alive_s: float = Field(30.0, gt=0, description="an idle client connection is closed after this many seconds "
                                "(longer than clients' pauses, so that a reused connection is never closed under them)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies are refused with 413")
    max_history_items: int = Field(10_000, ge=1, description="most item ids in a POSTed history or exclude list (422 above)")
    max_unknown_ids_shown: int = Field(20, ge=1, description="unknown item ids listed in a 422 (the count is always given)")


class RegistrySettings(Section):
    model_name: str = "attnrec"
    champion_alias: str = "champion"
    popularity_floor: bool = Field(True, description="never promote a model whose validation score is below the "
                                   "most-popular baseline's (the first model included)")
    promotion_tolerance: float = Field(0.0, ge=0, description="a challenger may trail the champion's validation score (train.selection_metric) by this much")


class Settings(BaseSettings):
    """All of attnrec's configuration. Paths are absolute after validation."""

    model_config = SettingsConfigDict(
        env_prefix="ATTNREC_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".attnrec"), description="state folder")
    duckdb_path: Path | None = Field(None, description="warehouse file (default: HOME/warehouse.duckdb)")
    mlflow_tracking_uri: str | None = Field(None, description="default: sqlite:///HOME/mlflow.db")
    mlflow_artifact_root: Path | None = Field(None, description="default: HOME/mlartifacts")
    prefect_api_url: str | None = Field(None, description="default: Prefect's local API with its database in HOME/prefect")
    inbox: Path | None = Field(None, description="folder the pipeline flow ingests new event files from (default: HOME/inbox)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Engine = Field("local", description="where the flows' fan-out steps, batch scoring and multi-worker training "
                                                "run: local (this process) or ray (a Ray cluster; `pip install 'attnrec[ray]'`)")
    ray_address: str | None = Field(None, description="the Ray cluster of engine = ray: auto (the cluster started on this "
                                                      "machine by `ray start`), ray://host:port (a remote one), or unset "
                                                      "(a private Ray started on this machine for the run)")
    partitions: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="user partitions batch scoring and evaluation are split into on Ray, one "
                                "Ray task each; auto: one per CPU of the cluster")
    event_buckets: int = Field(16, ge=1, description="user buckets (user_key mod N) the feature build reads one at a "
                                                    "time, and of the partitioned Parquet copy of the events "
                                                    "(HOME/events/bucket=N/) that engine = ray writes after ingest and "
                                                    "builds feature histories from, one Ray task per bucket")

    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    features: FeatureSettings = FeatureSettings()
    serve: ServeSettings = ServeSettings()
    registry: RegistrySettings = RegistrySettings()

    @model_validator(mode="after")
    def _resolve_paths(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        if self.duckdb_path is None:
            self.duckdb_path = self.home / "warehouse.duckdb"
        self.duckdb_path = self.duckdb_path.expanduser().resolve()
        if self.mlflow_artifact_root is None:
            self.mlflow_artifact_root = self.home / "mlartifacts"
        self.mlflow_artifact_root = self.mlflow_artifact_root.expanduser().resolve()
        if self.mlflow_tracking_uri is None:
            self.mlflow_tracking_uri = f"sqlite:///{self.home / 'mlflow.db'}"
        if self.inbox is None:
            self.inbox = self.home / "inbox"
        self.inbox = self.inbox.expanduser().resolve()
        return self

    # Derived locations: one place that says where things live in the state folder.
    @property
    def features_dir(self) -> Path:
        return self.home / "features"

    @property
    def events_dir(self) -> Path:
        return self.home / "events"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("ATTNREC_CONFIG", CONFIG_FILE_NAME))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Settings from defaults, ``attnrec.toml``, the environment and ``overrides``.

    ``overrides`` take dotted or nested keys: ``load_settings(train={"epochs": 3})`` or
    ``load_settings(**{"train.epochs": 3})``. ``None`` values are dropped so that unset CLI
    flags do not mask the environment. An unknown key, in any source, or a bad value raises
    one ``UserError`` line that names it (and the settings its name is close to).
    """
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"invalid settings: {key} = {value!r}: {'.'.join(parts[:-1])} is not a group of settings")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    unknown_env = sorted(name for name in os.environ if name.upper().startswith("ATTNREC_")
                         and name.upper() not in OTHER_ENV
                         and name.upper().removeprefix("ATTNREC_").split("__")[0].lower() not in Settings.model_fields)
    if unknown_env:
        names = ["ATTNREC_" + n.replace(".", "__").upper() for n in _setting_names()]
        raise UserError("invalid settings: unknown environment variable " + "; ".join(
            name + _close_to(name.upper(), names) for name in unknown_env))
    try:
        return Settings(**nested)
    except ValidationError as exc:
        raise invalid_settings(exc) from None


def _setting_names(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Every setting's dotted name (``train.epochs``)."""
    names = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += _setting_names(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def _close_to(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def invalid_settings(exc: ValidationError) -> UserError:
    """A settings validation error as one line a user can act on (the CLI's ``error:`` line)."""
    parts: dict[str, str] = {}
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        if e["type"] == "literal_error" and loc and loc[-1] == "literal['auto']":
            continue  # the other side of an "auto" union: said once below as "or 'auto'"
        if loc and (loc[-1].startswith("constrained-") or loc[-1] in ("int", "float")):
            loc, also = loc[:-1], ", or 'auto'"  # a number-or-"auto" setting: name the setting, not pydantic's branch
        else:
            also = ""
        where = ".".join(loc)
        if e["type"] == "extra_forbidden":
            parts.setdefault(where, f"unknown setting {where}" + _close_to(where, _setting_names()))
        else:
            parts.setdefault(where, f"{where} = {e.get('input')!r}: {e['msg']}{also}")
    return UserError("invalid settings: " + "; ".join(parts.values()))
