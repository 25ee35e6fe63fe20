"""attnrec's pipeline: configuration, ingest, training, evaluation, retrieval, serving, tracking and the CLI.

All file, database and network I/O of attnrec lives in this package.
"""

__version__ = "0.1.0"
