"""The screening model as an MLflow pyfunc: registered with a champion alias, loaded by URI,
served over REST on 127.0.0.1, and giving the scores of ``sparsegan predict``."""

from __future__ import annotations

import base64
import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsegan.models import build_detector
from sparsegan.params import ModelParams, Params
from sparsegan.predict import main
from sparsegan.train import model_file

SIZE = 32


def _scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:70, 0:90]
    band = 128 + 100 * np.sin(2 * np.pi * (y / 70 * 3 + 0.1 * np.sin(2 * np.pi * x / 90) + seed))
    return np.clip(band + rng.normal(0, 20, (70, 90)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding sparse-gan-oct-sparse_gan (version 1, alias champion) and
    sparse-gan-oct-autoencoder, logged as the evaluate stage logs them."""
    import mlflow

    from sparsegan.serving import log_screening_model, set_champion
    from sparsegan.tracking import start_run

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)  # the artifact root (./mlruns) is fixed where the experiment is created
    scans = root / "scans"
    scans.mkdir()
    for k in (1, 2):
        Image.fromarray(_scan(k)).save(scans / f"s{k}.png")
    for variant, phi in (("sparse_gan", 0.0), ("autoencoder", 1e9)):
        params = Params(model=ModelParams(base_channels=4))
        torch.manual_seed(0)
        detector = build_detector(variant, params, SIZE).eval()
        (root / "models" / variant).mkdir(parents=True)
        torch.save(model_file(variant, params, SIZE, "x", detector.state_dict(),
                              {"source": "folder", "n_train": 4}),
                   root / "models" / variant / "model.pt")
        calibration = {"phi": phi, "criterion": "youden",
                       "patient": {"aggregation": "max", "phi": phi}}
        (root / "cal" / variant).mkdir(parents=True)
        (root / "cal" / variant / "calibration.json").write_text(json.dumps(calibration))
        with start_run(variant):
            log_screening_model(variant, root / "models" / variant, calibration, scans / "s1.png")
        mlflow.end_run()
    assert set_champion({"sparse_gan": 0.8, "autoencoder": 0.7}) == "sparse_gan"
    os.chdir(cwd)
    yield {"root": root, "uri": uri, "scans": scans}
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _predict_csv(argv, out):
    assert main(["predict", *argv, "--out", str(out), "--device", "cpu"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_registry_champion_pyfunc_and_model_uri_match_the_local_model(store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("sparse-gan-oct-sparse_gan", "champion")
    assert int(champion.version) == 1
    assert {m.name for m in client.search_registered_models()} == {
        "sparse-gan-oct-sparse_gan", "sparse-gan-oct-autoencoder"}
    model = mlflow.pyfunc.load_model("models:/sparse-gan-oct-sparse_gan@champion")
    assert model.metadata.get_input_schema().input_names() == ["image"]
    scans = store["scans"]
    out = model.predict(__import__("pandas").DataFrame(
        {"image": [_b64(scans / "s1.png"), str(scans / "s2.png")]}))
    local = _predict_csv(["--variant", "sparse_gan", "--models", str(store["root"] / "models"),
                          "--calibration", str(store["root"] / "cal"), str(scans)],
                         tmp_path / "local")
    by_uri = _predict_csv(["--model-uri", "models:/sparse-gan-oct-sparse_gan@champion",
                           str(scans)], tmp_path / "uri")
    assert [r["score"] for r in by_uri] == [r["score"] for r in local]
    assert [r["decision"] for r in by_uri] == [r["decision"] for r in local] == ["disease"] * 2
    np.testing.assert_allclose(out["score"], [float(r["score"]) for r in local], rtol=1e-5)
    with Image.open(__import__("io").BytesIO(base64.b64decode(out["map_png"][0]))) as im:
        assert im.size == (SIZE, SIZE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_with_the_predict_scores(store, tmp_path):
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow and the uvicorn it starts
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = bin_dir / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m",
                               "models:/sparse-gan-oct-sparse_gan@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
        scans = store["scans"]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [_b64(scans / "s1.png")], [_b64(scans / "s2.png")]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    local = _predict_csv(["--variant", "sparse_gan", "--models", str(store["root"] / "models"),
                          "--calibration", str(store["root"] / "cal"), str(store["scans"])],
                         tmp_path / "local")
    assert [a["decision"] for a in answer] == [r["decision"] for r in local]
    np.testing.assert_allclose([a["score"] for a in answer],
                               [float(r["score"]) for r in local], rtol=1e-5)


def test_the_served_model_warns_once_when_trained_on_synthetic_scans(store, tmp_path, caplog):
    import logging

    import pandas as pd

    from sparsegan.serving import ScreeningModel, screening_config

    state = torch.load(store["root"] / "models" / "sparse_gan" / "model.pt", weights_only=True)
    state["data"] = {"source": "synthetic", "n_train": 2400}
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "c.json").write_text(json.dumps(screening_config(
        "sparse_gan", {"phi": 0.0}, "aam_residual")))

    class Ctx:
        artifacts = {"weights": str(tmp_path / "model.pt"), "config": str(tmp_path / "c.json")}

    model = ScreeningModel()
    model.load_context(Ctx())
    frame = pd.DataFrame({"image": [str(store["scans"] / "s1.png")]})
    with caplog.at_level(logging.WARNING, logger="sparsegan.serving"):
        model.predict(Ctx(), frame)
        model.predict(Ctx(), frame)
    warnings = [r for r in caplog.records if "trained on synthetic scans" in r.getMessage()]
    assert len(warnings) == 1 and "2400" in warnings[0].getMessage()
