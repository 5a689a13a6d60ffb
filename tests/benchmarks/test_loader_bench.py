"""``benchmarks/loader.py --smoke`` runs the side-by-side loader benchmark end to end (tiny samples, our loader
and plain pyarrow, one epoch each from its own S3 endpoint) without the optional peer libraries, and reports
what it measured: so the benchmark is known to work before litdata and mosaicml-streaming are installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_reads_one_epoch_from_s3_and_reports_each_figure(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/loader.py", "--smoke", "--work", str(tmp_path),
                           "--json", str(tmp_path / "loader.json")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    medians = json.loads((tmp_path / "loader.json").read_text())["medians"]
    assert sorted(medians) == ["ours/0", "pyarrow/0"]
    ours, floor = medians["ours/0"], medians["pyarrow/0"]
    # 96 samples in 6 shards of 16, batches of 8: ours delivers the whole epoch, each batch from 6 shards;
    # pyarrow, a whole file at a time, from one
    assert ours["samples"] == floor["samples"] == 96
    assert ours["mix"] == 6.0 and floor["mix"] == 1.0
    for figures in (ours, floor):
        assert figures["samples_per_s"] > 0 and 0 < figures["first_batch_s"] < 60
        assert figures["gets"] >= 6 and figures["mib_served"] > 0  # counted by the S3 endpoint
    assert "| ours | 0 |" in done.stdout and "| pyarrow | 0 |" in done.stdout
    assert "against litdata: not measured" in done.stdout
