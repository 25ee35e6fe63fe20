"""The training layer: a feature set in, a trained model and its metrics out.

``batches`` cuts left-padded sequence batches out of a feature set; ``loop`` is the one
model-agnostic training loop (``fit``), ``optimizer`` its AdamW (with the row-wise form for
the item tables), clipping and schedule; ``recipe`` trains attnrec's SASRec and fits the
baselines with it; ``evaluation`` is the one full-ranking evaluator. No MLflow, no
serving: the application layer (``pipeline.app``) tracks, registers and serves.
"""
