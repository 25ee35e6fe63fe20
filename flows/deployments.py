"""Deployments of the attnrec flows, served by one long-running process (``flow.serve``).

    attnrec deploy          # local Prefect server + this process; then, in another shell:
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'attnrec-pipeline/nightly'

``attnrec-pipeline/nightly`` runs on a cron schedule (default 02:00 every day);
``attnrec-pipeline/adhoc`` and one ``<flow>/manual`` deployment per flow run on demand with
parameters (``--param k=20``, ``--params '{"overrides": {"train.epochs": 5}}'``).
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import RunnerDeployment

from flows.pipeline_flows import (
    attnrec_pipeline,
    build_features_flow,
    build_index_flow,
    evaluate_flow,
    ingest_flow,
    recommend_all_flow,
    train_flow,
)

NIGHTLY_CRON = "0 2 * * *"


def deployments(home: str, cron: str = NIGHTLY_CRON, pipeline_parameters: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The deployments for the installation whose state folder is ``home``."""
    base = {"home": home}
    pipeline = {**base, **(pipeline_parameters or {})}
    out = [
        attnrec_pipeline.to_deployment(name="nightly", cron=cron, parameters=pipeline, tags=["attnrec", "scheduled"],
                                       description="Nightly: ingest the inbox, features, train + gate, index, batch recommendations."),
        attnrec_pipeline.to_deployment(name="adhoc", parameters=pipeline, tags=["attnrec"],
                                       description="The whole pipeline on demand; override any parameter."),
    ]
    for f in (ingest_flow, build_features_flow, train_flow, evaluate_flow, build_index_flow, recommend_all_flow):
        out.append(f.to_deployment(name="manual", parameters=base, tags=["attnrec"]))
    return out
