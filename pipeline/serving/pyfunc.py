"""The attnrec MLflow pyfunc model, logged "from code" (MLflow loads this file).

Input: a DataFrame with column ``items`` (list of item ids, oldest first), one query per row.
Params: ``k`` (default 10), ``explain`` (default false: attach the reasons), ``exclude_seen``
(default true). Output: one row per input row, the body ``POST /recommendations`` answers:
``recommendations`` (item_id, title, score and reasons per item), ``fallback`` ("popular" for a
history the model cannot read), ``history_length``, ``model_version`` (the bundle's label: the registry version is not known
inside the model); a row whose ids the model
does not know gets no recommendations, ``error`` naming them and ``unknown_items`` (the API's
422), while the other rows are answered. All rows go through the one query path
(``pipeline.serving.query.recommend``) in one call.

    model = mlflow.pyfunc.load_model("models:/attnrec@champion")
    model.predict(pd.DataFrame({"items": [["1", "260"]]}), params={"k": 5, "explain": True})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.errors import UserError


class AttnrecModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from pipeline.registry.model_store import Bundle

        self.bundle = Bundle.load(Path(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline.serving.query import Filters, indices_of_ids, recommend

        params = params or {}
        k, explain = int(params.get("k", 10)), bool(params.get("explain", False))
        filters = Filters(exclude_seen=bool(params.get("exclude_seen", True)))
        histories: list[np.ndarray] = []
        errors: list[tuple[str, list[str]] | None] = []
        for items in model_input["items"]:
            try:
                known, unknown = indices_of_ids(self.bundle, list(items))
            except UserError as exc:  # an id the identity rule refuses (empty, too long)
                known, unknown, error = [], [], (str(exc), [])
            else:
                error = (f"unknown item ids: {', '.join(unknown)}", unknown) if unknown else None
            errors.append(error)
            histories.append(np.asarray(known if error is None else [], dtype=np.int64))
        answered = iter(recommend(self.bundle, [h for h, e in zip(histories, errors, strict=True) if e is None], k,
                                  explain, filters))
        rows = []
        for error in errors:
            if error is None:
                answer = next(answered).as_dict()
                answer.pop("known_user")
                rows.append({**answer, "error": None, "unknown_items": []})
            else:
                rows.append({"recommendations": [], "fallback": None, "model_version": self.bundle.version,
                             "history_length": 0, "error": error[0], "unknown_items": error[1]})
        # object columns: pandas' string dtype would turn a missing error or fallback into NaN
        return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in OUTPUT_COLUMNS})


OUTPUT_COLUMNS = ("recommendations", "fallback", "model_version", "history_length", "error", "unknown_items")

mlflow.models.set_model(AttnrecModel())
