"""The application layer: the steps every CLI command and every Prefect task calls.

``steps`` holds the step functions (ingest, features, train + gate, evaluate, index,
batch recommendations); ``cli`` is the ``attnrec`` command; ``prefect_setup`` points
Prefect at its local API or a real server. The Prefect flows themselves are in ``flows/``.
"""
