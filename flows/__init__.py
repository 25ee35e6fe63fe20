"""Thin Prefect flows and deployments over the step functions of ``pipeline.app.steps`` (the ones the CLI calls)."""
