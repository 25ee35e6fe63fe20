"""attnrec's pipeline: all I/O and orchestration, in sub-packages by layer.

    config, errors   typed settings; the errors a user can act on
    data/            warehouse, identity rule, ingest, item catalogue, histories, feature sets
    registry/        model files, bundles and their FAISS index, MLflow tracking and registry
    training/        batches, the training loop, the SASRec recipe, the evaluator
    serving/         the one query path, the Python API (``Recommender``), HTTP, MLflow pyfunc
    app/             the steps under the CLI and the Prefect flows
    cli              the ``attnrec`` command: a shell over app/, serving/ and flows/

Each layer imports only the layers listed above it. ``from pipeline import Recommender`` is
the Python API (imported on first use, so ``import pipeline.config`` stays light).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any

__version__ = version("attnrec")  # pyproject.toml's, as installed
__all__ = ["Recommender"]

if TYPE_CHECKING:
    from pipeline.serving.recommender import Recommender


def __getattr__(name: str) -> Any:
    if name == "Recommender":
        from pipeline.serving.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
