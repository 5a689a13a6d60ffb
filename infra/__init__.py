"""Shared infrastructure: the config system, below every other layer, and the local stack
(``python -m infra.local``: an object store, an MLflow server and a Ray head on 127.0.0.1)."""
