"""Which model a command uses: an explicit bundle folder, else the latest trained run."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import UserError


def resolve_bundle(settings: Settings, ref: str | None) -> Path:
    """A model bundle folder (``model.pt`` + ``items.parquet`` + ``index/``).

    ``ref``: a bundle folder or a ``model.pt`` inside one; None: the latest run of
    ``attnrec train`` in the state folder.
    """
    if ref is None:
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
