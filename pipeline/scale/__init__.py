"""The scale-out layer: the same steps on a Ray cluster (``engine = "ray"``).

``cluster`` connects to Ray (``ray_address``) and starts a local head node for tests and
benchmarks; ``batch_scoring`` runs ``recommend-all`` as one Ray task per user partition;
``training`` runs the one training recipe as torch DDP on Ray Train's ``TorchTrainer``;
``features`` builds the feature set's histories as one Ray task per user bucket, each writing its piece;
``evaluation`` scores an evaluation's users in shares, one Ray task each (the test report
of a multi-worker run);
``ingest`` reads and checks many event files at once, one Ray task per file, for the
driver to commit in order.
Ray is imported inside their functions only, so the plain install (without the ``ray``
extra) never needs it.
"""
