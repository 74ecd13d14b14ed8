"""Screenshot of the MLflow UI comparing pipeline runs side by side (for the README).

    python scripts/mlflow_screenshot.py [--db mlflow.db] [--out docs/mlflow_runs.png] [--runs 2]

Starts ``mlflow ui`` on a free port of 127.0.0.1 over the store and opens, in headless Chromium
(the ``chromium`` command, ``.ci/install_chromium.sh``), the "compare runs" page of the newest
``--runs`` *parent* runs that the report stage completed: one per DVC experiment or pipeline run,
each holding every param and every row's seed-mean AUCs (``<row>.val_auc``, ``<row>.test_auc``),
so two experiments that differ in one param (``dvc exp run -S train.lambda_sp=25``) show that
param and each row's numbers side by side. Saves the PNG and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from sparsegan.tracking import EXPERIMENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_parents(uri: str, n: int) -> tuple[str, list[str]]:
    """(experiment id, run ids of the newest ``n`` parent runs with the report's metrics)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise SystemExit(f"{uri}: no experiment {EXPERIMENT!r}; run the pipeline first")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=500)
    parents = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags
               and any(k.endswith(".val_auc") for k in r.data.metrics)][:n]
    if len(parents) < n:
        raise SystemExit(f"{uri}: {len(parents)} pipeline run(s) with a report, {n} wanted; run "
                         f"`dvc repro` and `dvc exp run -S train.lambda_sp=25` first")
    return exp.experiment_id, parents[::-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=ROOT / "mlflow.db")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow_runs.png")
    ap.add_argument("--size", default="1600,1000", help="window width,height")
    ap.add_argument("--runs", type=int, default=2, help="how many pipeline runs to compare")
    a = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium command; run bash .ci/install_chromium.sh")
    uri = f"sqlite:///{a.db.resolve()}"
    exp_id, run_ids = latest_parents(uri, a.runs)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui",
                               "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("mlflow ui did not start") from None
                time.sleep(1)
        # workflowType: the model-training view (a fresh browser profile opens the GenAI one)
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids),
                                        "experiments": json.dumps([exp_id]),
                                        "workflowType": "machine_learning"})
        url = f"http://127.0.0.1:{port}/#/compare-runs?{query}"
        a.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--window-size={a.size}",
                        "--virtual-time-budget=20000", f"--screenshot={a.out.resolve()}", url],
                       check=True, capture_output=True, timeout=180)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"{a.out} <- {url}")


if __name__ == "__main__":
    main()
