"""The application layer: the steps every CLI command and every Prefect task calls.

``steps`` holds the step functions (ingest, features, train + the promotion gate, evaluate,
index, batch recommendations, serve); ``prefect_setup`` points Prefect at its local API or a
real server. The shells over them: ``pipeline/cli.py`` (the ``attnrec`` command) and the
Prefect flows in ``flows/``.
"""
