"""The registry layer: models at rest.

``model_store`` saves and loads model files and bundles (model + item table + FAISS
index), ``index`` builds and loads the FAISS index, ``tracking`` is attnrec's MLflow I/O
(runs, artefacts, the model registry and its aliases), ``run_report`` renders a run's
report and plots.
"""
