"""The scale-out layer: the same steps on a Ray cluster (``engine = "ray"``).

``cluster`` connects to Ray (``ray_address``) and starts a local head node for tests and
benchmarks; ``batch_scoring`` runs ``recommend-all`` as one Ray task per user partition;
``training`` runs the one training recipe as torch DDP on Ray Train's ``TorchTrainer``;
``features`` builds the feature set's histories as one Ray task per user bucket.
Ray is imported inside their functions only, so the plain install (without the ``ray``
extra) never needs it.
"""
