"""The data layer: event logs and item content in, the DuckDB warehouse, feature sets out.

``identity`` is the one rule that turns user and item ids into warehouse keys;
``ingest`` / ``ingest_formats`` load event logs exactly once; ``catalog`` loads item
content; ``warehouse`` holds the schema, connections and the ``stats`` summary;
``histories`` reads users' histories back for serving; ``event_dataset`` copies the events
by user bucket into a partitioned Parquet dataset for parallel readers; ``feature_store``
builds the versioned feature sets the trainer memory-maps (pure transforms live in
``features/``).
Nothing here knows about models.
"""
