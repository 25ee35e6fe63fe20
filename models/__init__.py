"""Torch modules only: the item tower, the SASRec encoder and the baselines. No I/O here."""
