"""Which model a command uses: the registry champion by default, or an explicit reference."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import UserError


def default_model_uri(settings: Settings) -> str:
    return f"models:/{settings.registry.model_name}@{settings.registry.champion_alias}"


def resolve_bundle(settings: Settings, ref: str | None) -> Path:
    """A local model bundle folder (``model.pt`` + ``items.parquet`` + ``index/``).

    ``ref``: None -> ``models:/attnrec@champion``; ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION`` -> downloaded from the MLflow registry (cached in the state
    folder); ``latest`` -> the newest local ``attnrec train`` run; otherwise a bundle
    folder or a ``model.pt`` inside one.
    """
    ref = ref or default_model_uri(settings)
    if ref.startswith("models:/"):
        from pipeline.registry.tracking import download_bundle

        return download_bundle(settings, ref)
    if ref == "latest":
        pointer = settings.runs_dir / "LATEST"
        if not pointer.exists():
            raise UserError(f"no trained model in {settings.runs_dir}: run `attnrec train` first")
        path = settings.runs_dir / pointer.read_text().strip()
    else:
        path = Path(ref).expanduser().resolve()
        if path.name == "model.pt":
            path = path.parent
    if not (path / "model.pt").exists():
        raise UserError(f"{path} is not a model bundle (no model.pt)")
    return path
