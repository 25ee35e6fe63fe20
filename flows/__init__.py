"""Thin Prefect flows over the plain functions of ``pipeline``."""
