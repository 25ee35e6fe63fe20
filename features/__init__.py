"""Pure Polars transforms from warehouse frames to model-ready features. No I/O here."""
