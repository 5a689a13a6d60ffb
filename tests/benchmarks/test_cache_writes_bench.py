"""``benchmarks/cache_writes.py`` runs each way of writing the node cache on a small amount of data and
prints a row for each, with figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_small_run_prints_every_way_with_its_figures(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/cache_writes.py", "--gib", "0.0625", "--repeats", "1",
                           "--dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"joined, one write", "joined, 256 KiB writes", "streamed", "joined, no file"}
    assert not list(tmp_path.iterdir())  # every run's files deleted
