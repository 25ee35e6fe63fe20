"""The attnrec MLflow pyfunc model, logged "from code" (MLflow loads this file).

Input: a DataFrame with column ``items`` (list of item ids, oldest first); param ``k``
(default 10). Output: one row per input row with ``item_ids`` and ``scores`` (lists),
answered by the one query path (``pipeline.serving.query.recommend``), all rows in one call.

    model = mlflow.pyfunc.load_model("models:/attnrec@champion")
    model.predict(pd.DataFrame({"items": [["1", "260"]]}), params={"k": 5})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class AttnrecModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from pipeline.registry.model_store import Bundle

        self.bundle = Bundle.load(Path(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline.serving.query import indices_of_ids, recommend

        k = int((params or {}).get("k", 10))
        histories = [np.asarray(indices_of_ids(self.bundle, list(items))[0], dtype=np.int64) for items in model_input["items"]]
        answers = recommend(self.bundle, histories, k)
        return pd.DataFrame({"item_ids": [[r.item_id for r in a.recommendations] for a in answers],
                             "scores": [[r.score for r in a.recommendations] for a in answers]})


mlflow.models.set_model(AttnrecModel())
