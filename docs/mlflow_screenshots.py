"""Screenshots of a run in the MLflow UI, as a user sees it, for docs/images/.

    python docs/mlflow_screenshots.py --store sqlite:///$HOME/flowscale/mlflow.db [--experiment demo] [--run-id ID]

Starts `mlflow ui` on 127.0.0.1 over the given store, picks the newest run of the experiment (or --run-id),
and has headless Chromium (Debian's `chromium` package) render three pages: the run's overview (status,
duration, tags, params), its model-metrics charts, and the image view of its sample grids. Writes
docs/images/mlflow-run.png, mlflow-metrics.png and mlflow-grid.png.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent / "images"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1500,1100",
    "--virtual-time-budget=20000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"wrote {out}  ({url})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the MLflow backend store URI the job printed")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--run-id", default=None, help="default: the experiment's newest run")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.store}")
    run = client.get_run(args.run_id) if args.run_id else client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.store,
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        page = f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        view = "?workflowType=machine_learning"  # the UI's model-training view (it defaults to GenAI)
        OUT.mkdir(exist_ok=True)
        screenshot(page + view, OUT / "mlflow-run.png")
        screenshot(f"{page}/model-metrics{view}", OUT / "mlflow-metrics.png")
        grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png"))
        last = max(grids, key=lambda p: int(p.split("+step+")[1].split("+")[0])) if grids else "samples.png"
        screenshot(f"{page}/artifacts/{last}{view}", OUT / "mlflow-grid.png")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
