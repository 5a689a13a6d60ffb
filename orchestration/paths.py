"""Where flowscale keeps things on this machine when the config does not say: FLOWSCALE_HOME, by default
``~/flowscale``. Read through these functions (not copied at import) so a caller can move ``HOME``."""

from __future__ import annotations

from pathlib import Path

from infra.config import flowscale_home

HOME = flowscale_home()


def runs_dir() -> Path:
    """Local runs (``RUN/checkpoint_STEP``) when ``run.storage_path`` is empty."""
    return HOME / "runs"


def demo_dataset_dir() -> Path:
    """The digits demo dataset, written on first use when ``data.url`` is empty."""
    return HOME / "datasets" / "digits"


def cache_dir() -> Path:
    """Remote checkpoints fetched for reading (teachers, sampling), once per machine."""
    return HOME / "cache"


def grids_dir(run_name: str) -> Path:
    """Local copies of the final sample grids of a run stored remotely."""
    return HOME / "grids" / run_name
