"""The serving layer: the one query path and the front ends over it.

``query`` is the core every front end calls (histories in, top-k with scores and reasons
out); ``recommender`` is the Python API (``from pipeline import Recommender``); ``http``
the FastAPI server, ``pyfunc`` the MLflow model; batch scoring is
``Recommender.recommend_all``.
"""
