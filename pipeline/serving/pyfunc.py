"""The attnrec MLflow pyfunc model, logged "from code" (MLflow loads this file).

Input: a DataFrame with column ``items`` (list of item ids, oldest first); param ``k``
(default 10). Output: one row per input row with ``item_ids`` and ``scores`` (lists).

    model = mlflow.pyfunc.load_model("models:/attnrec@champion")
    model.predict(pd.DataFrame({"items": [["1", "260"]]}), params={"k": 5})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


def predict_frame(bundle: Any, model_input: pd.DataFrame, k: int) -> pd.DataFrame:
    ids, scores = [], []
    for items in model_input["items"]:
        known, _ = bundle.indices_of_ids([str(i) for i in items])
        resp = bundle.recommend(known, k)
        ids.append([r.item_id for r in resp.recommendations])
        scores.append([r.score for r in resp.recommendations])
    return pd.DataFrame({"item_ids": ids, "scores": scores})


class AttnrecModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from pipeline.serving.query import ModelBundle

        self.bundle = ModelBundle(Path(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.bundle, model_input, int((params or {}).get("k", 10)))


mlflow.models.set_model(AttnrecModel())
