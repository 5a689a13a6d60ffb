"""``benchmarks/gpu_suite.py --smoke`` runs every section of the GPU suite end to end on the CPU (tiny sizes, the
Triton kernel interpreted) and writes a JSON with figures for each, so that the suite is known to work before
a GPU is there to run it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def numbers(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]


def test_smoke_run_writes_every_section_with_figures(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["precision", "attention", "model_step", "scd_step", "pretrain_mfu"]
    errors = {name: s["traceback"] for name, s in sections.items() if "error" in s}
    assert not errors, errors
    result = {name: s["result"] for name, s in sections.items()}
    assert numbers(result["precision"]["tables"][0]["rows"], "grad_err_worst"), result["precision"]
    attention = result["attention"]["rows"][0]
    assert {"sdpa_forward", "fused_jvp", "math_jvp"} <= attention["ms"].keys(), attention
    assert result["attention"]["backend"] == "triton"  # the kernel itself ran, in Triton's interpreter
    assert len(numbers(result["model_step"]["rows"], "ratio")) == 2, result["model_step"]  # 2 resolutions
    assert len(numbers(result["scd_step"]["rows"], "ratio")) == 4, result["scd_step"]  # 2 passes x 2 precisions
    mfu = result["pretrain_mfu"]["rows"]
    assert len(numbers(mfu, "samples_per_s")) == 4, mfu  # compile and checkpointing, each on and off
    assert (tmp_path / "gpu_suite.md").read_text().startswith("# GPU suite")
