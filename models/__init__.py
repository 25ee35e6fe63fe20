"""Torch modules and losses only: the item tower, the SASRec encoder, the next-item losses and the baselines. No I/O here."""
