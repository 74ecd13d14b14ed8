"""The screening model as an MLflow pyfunc: one registered model per row, one version per
training seed (tagged ``seed``), the champion alias on the row with the best mean validation AUC
and its best validation seed, loaded by URI, served over REST on 127.0.0.1, and giving the
scores of ``sparsegan predict``."""

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
import pandas as pd
import pytest
import torch
from PIL import Image

from sparsegan.metrics import calibrate_row
from sparsegan.params import DataParams, ModelParams, Params, RuntimeParams, TrainParams
from sparsegan.predict import main
from sparsegan.train import train_model
from test_predict import SIZE, scan
from test_predict import processed as make_processed

# sparse_gan: two seeds (versions 1 and 2), the champion on seed 0 (version 1: chosen by
# validation, not the latest); autoencoder: one seed, its phi above any score
SPARSE_SEEDS = (0, 1)
VAL_AUCS = {"sparse_gan": {0: 0.9, 1: 0.8}, "autoencoder": {0: 0.7}}
PHI = {"sparse_gan": 0.0, "autoencoder": 1e9}


def _params(seeds) -> Params:
    return Params(seeds=tuple(seeds), model=ModelParams(base_channels=4),
                  data=DataParams(source="folder", folder="/data/oct", image_size=SIZE),
                  train=TrainParams(epochs=1, batch_size=4), runtime=RuntimeParams(device="cpu"))


def _calibrate(root: Path, row: str, params: Params, phi: float) -> dict[int, dict]:
    """``cal/<row>/calibration/s<seed>.json`` by calibrate_row from validation scores with
    patients (so that it has a patient rule), phi then set to ``phi``; the score settings
    beside the scores as the score stage writes them."""
    model, score = params.rows[row]
    for seed in params.seeds:
        folder = root / "scores" / model / f"s{seed}" / score
        folder.mkdir(parents=True, exist_ok=True)
        (folder.parent / "settings.json").write_text(json.dumps(
            {"model": model, "seed": seed, "score": {"anogan": {"search_steps": 7}}}))
        pd.DataFrame({"label": [0, 0, 0, 0, 1, 1, 1, 1],
                      "score": [0.1, 0.3, 0.2, 0.25, 0.4, 0.6, 0.5, 0.2],
                      "patient": ["a", "a", "b", "b", "c", "c", "d", "d"]}
                     ).to_csv(folder / "val.csv", index=False)
    out = root / "cal" / row / "calibration"
    result = calibrate_row(row, params, root / "scores", out)
    for seed, cal in result.items():
        assert cal["patient"]["aggregation"] in ("max", "mean", "top3_mean")
        cal["phi"] = phi
        (out / f"s{seed}.json").write_text(json.dumps(cal))
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store in which the models were trained (train_model, one child run per model and
    seed under the pipeline's parent run) and, as the evaluate stage logs them, registered into
    those runs: sparse-gan-oct-sparse_gan versions 1 (seed 0) and 2 (seed 1) and
    sparse-gan-oct-autoencoder version 1 (seed 0); then the champion set by validation AUC."""
    import mlflow

    from sparsegan.screening import read_config
    from sparsegan.serving import log_screening_model, set_champion
    from sparsegan.tracking import start_run

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)  # the artifact root (./mlruns) is fixed where the experiment is created
    try:
        scans = root / "scans"
        scans.mkdir()
        for k in (1, 2):
            Image.fromarray(scan(90, 70, k)).save(scans / f"s{k}.png")
        processed = make_processed(root)
        calibrations = {}
        for row, seeds in (("sparse_gan", SPARSE_SEEDS), ("autoencoder", (0,))):
            params = _params(seeds)
            model = params.rows[row][0]
            calibrations[row] = _calibrate(root, row, params, PHI[row])
            for seed in seeds:
                where = Path(model) / f"s{seed}"
                record = root / "runs" / f"{model}-s{seed}.json"
                train_model(model, seed, params, processed, root / "models" / where,
                            root / "checkpoints" / where, log_mlflow=True, run_file=record)
                run_id = json.loads(record.read_text())["mlflow_run_id"]
                with start_run(model, seed, run_id):
                    config = read_config(root / "cal" / row / "calibration" / f"s{seed}.json",
                                         root / "scores" / where / "settings.json")
                    log_screening_model(root / "models" / where, config, scans / "s1.png")
        assert mlflow.active_run() is None
        champion = set_champion(VAL_AUCS)
    finally:
        os.chdir(cwd)
    yield {"root": root, "uri": uri, "scans": scans, "champion": champion,
           "calibrations": calibrations}
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def _predict_csv(argv, out):
    assert main(["predict", *argv, "--out", str(out), "--device", "cpu"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _local(store, out, row="sparse_gan", seed=0):
    """``sparsegan predict`` of the scans with the local files of ``row`` and ``seed``."""
    return _predict_csv(["--row", row, "--seed", str(seed), "--models",
                         str(store["root"] / "models"), "--calibration",
                         str(store["root"] / "cal"), "--scores", str(store["root"] / "scores"),
                         str(store["scans"])], out)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_one_registered_model_per_row_one_version_per_seed_in_its_training_run(store):
    import mlflow

    from sparsegan.tracking import PIPELINE_TAG

    client = mlflow.MlflowClient()
    assert {m.name for m in client.search_registered_models()} == {
        "sparse-gan-oct-sparse_gan", "sparse-gan-oct-autoencoder"}
    versions = client.search_model_versions("name = 'sparse-gan-oct-sparse_gan'")
    assert sorted((int(v.version), v.tags.get("seed")) for v in versions) == [(1, "0"), (2, "1")]
    (ae,) = client.search_model_versions("name = 'sparse-gan-oct-autoencoder'")
    assert ae.tags.get("seed") == "0"
    parents = set()
    for v in [*versions, ae]:
        model = "sparse_gan" if v.name.endswith("sparse_gan") else "autoencoder"
        record = store["root"] / "runs" / f"{model}-s{v.tags['seed']}.json"
        # logged into the child run that trained that model and seed
        assert v.run_id == json.loads(record.read_text())["mlflow_run_id"]
        run = client.get_run(v.run_id)
        assert run.data.tags["model"] == model and run.data.tags["seed"] == v.tags["seed"]
        parents.add(run.data.tags["mlflow.parentRunId"])
    (parent,) = parents  # one pipeline run holds them all
    assert PIPELINE_TAG in client.get_run(parent).data.tags


def test_registry_champion_pyfunc_and_model_uri_match_the_local_model(store, tmp_path):
    import mlflow

    from sparsegan.serving import resolve_model_uri

    assert store["champion"] == ("sparse_gan", 0)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("sparse-gan-oct-sparse_gan", "champion")
    assert int(champion.version) == 1 and champion.tags["seed"] == "0"
    with pytest.raises(mlflow.exceptions.MlflowException):  # one champion, on one row
        client.get_model_version_by_alias("sparse-gan-oct-autoencoder", "champion")
    _, config = resolve_model_uri("models:/sparse-gan-oct-sparse_gan@champion")
    cal = store["calibrations"]["sparse_gan"][0]
    assert (config["row"], config["model"], config["score"], config["seed"]) == (
        "sparse_gan", "sparse_gan", "latent", 0)
    assert config["phi"] == 0.0 and config["map"] == "aam_residual"  # no masks: default_map
    assert config["patient"] == {"aggregation": cal["patient"]["aggregation"]}
    assert config["score_params"] == {"anogan": {"search_steps": 7}}  # the score stage's

    model = mlflow.pyfunc.load_model("models:/sparse-gan-oct-sparse_gan@champion")
    assert model.metadata.get_input_schema().input_names() == ["image"]
    scans = store["scans"]
    out = model.predict(pd.DataFrame({"image": [_b64(scans / "s1.png"), str(scans / "s2.png")]}))
    # the written-down signature is what the model returns
    assert model.metadata.get_output_schema().input_names() == list(out.columns) == [
        "score", "phi", "decision", "map_png"]
    local = _local(store, tmp_path / "local", seed=0)
    other_seed = _local(store, tmp_path / "local1", seed=1)
    by_uri = _predict_csv(["--model-uri", "models:/sparse-gan-oct-sparse_gan@champion",
                           str(scans)], tmp_path / "uri")
    assert [r["score"] for r in by_uri] == [r["score"] for r in local]
    assert [r["score"] for r in by_uri] != [r["score"] for r in other_seed]  # seed 0's model
    assert [r["decision"] for r in by_uri] == [r["decision"] for r in local] == ["disease"] * 2
    np.testing.assert_allclose(out["score"], [float(r["score"]) for r in local], rtol=1e-5)
    assert list(out["decision"]) == ["disease"] * 2 and list(out["phi"]) == [0.0, 0.0]
    with Image.open(__import__("io").BytesIO(base64.b64decode(out["map_png"][0]))) as im:
        assert im.size == (SIZE, SIZE)
    # the patient rule travels with the registered model
    assert (tmp_path / "uri" / "patients.csv").read_text() == \
        (tmp_path / "local" / "patients.csv").read_text()


def test_a_row_of_the_image_score_registers_the_difference_map_and_its_phi(store, tmp_path):
    import mlflow

    from sparsegan.serving import resolve_model_uri

    uri = "models:/sparse-gan-oct-autoencoder/1"
    _, config = resolve_model_uri(uri)
    assert (config["row"], config["score"], config["seed"], config["map"]) == (
        "autoencoder", "image", 0, "difference")
    out = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [str(store["scans"] / "s1.png")]}))
    local = _local(store, tmp_path / "local", row="autoencoder")
    assert list(out["decision"]) == ["normal"] and local[0]["decision"] == "normal"  # phi 1e9
    assert out["score"][0] == pytest.approx(float(local[0]["score"]), rel=1e-5)


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
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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
    local = _local(store, tmp_path / "local", seed=store["champion"][1])
    assert [a["decision"] for a in answer] == [r["decision"] for r in local]
    np.testing.assert_allclose([a["score"] for a in answer],
                               [float(r["score"]) for r in local], rtol=1e-5)


def test_the_served_model_warns_once_when_trained_on_synthetic_scans(store, tmp_path, caplog):
    import logging

    from sparsegan.screening import screening_config
    from sparsegan.serving import ScreeningModel

    state = torch.load(store["root"] / "models" / "sparse_gan" / "s0" / "model.pt",
                       weights_only=True)
    assert state["data"]["source"] == "folder"
    state["data"] = {"source": "synthetic", "n_train": 2400}
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "c.json").write_text(json.dumps(screening_config(
        store["calibrations"]["sparse_gan"][0],
        {"model": "sparse_gan", "seed": 0, "score": {}})))

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


def test_screening_config_joins_calibration_and_score_settings_of_one_model():
    from sparsegan.screening import ScreeningError, default_map, screening_config

    cal = {"row": "pix2pix_image", "model": "pix2pix", "score": "image", "seed": 3, "phi": 1,
           "criterion": "youden", "validation": {"auc": 0.8},
           "patient": {"aggregation": "mean", "n_patients": 9}}
    settings = {"model": "pix2pix", "seed": 3, "score": {"anogan": {"search_steps": 5}}}
    assert screening_config(cal, settings) == {
        "row": "pix2pix_image", "model": "pix2pix", "score": "image", "seed": 3,
        "score_params": {"anogan": {"search_steps": 5}}, "phi": 1.0, "criterion": "youden",
        "map": "difference", "patient": {"aggregation": "mean"}}
    assert screening_config({**cal, "patient": None, "map": "aam"}, settings)["patient"] is None
    with pytest.raises(ScreeningError, match="score settings are of pix2pix s4"):
        screening_config(cal, {**settings, "seed": 4})
    with pytest.raises(ScreeningError, match="not a calibration"):
        screening_config({"row": "x"}, settings)
    assert default_map("latent") == "aam_residual"
    assert [default_map(s) for s in ("image", "search", "izif")] == ["difference"] * 3


class _Version:
    def __init__(self, version: int, seed: int):
        self.version, self.tags = str(version), {"seed": str(seed)}


class _Client:
    """The two calls of MlflowClient that set_champion makes."""

    def __init__(self, versions: dict[str, list[_Version]]):
        self.versions, self.aliases = versions, {}

    def search_model_versions(self, filter_string):
        name = filter_string.split("'")[1]
        return list(self.versions.get(name, []))

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[(name, alias)] = version


def test_set_champion_best_mean_over_seeds_then_best_seed_latest_version():
    client = _Client({
        # max 0.95 but mean 0.775
        "sparse-gan-oct-a": [_Version(1, 0), _Version(2, 1)],
        # mean 0.8: the champion row; seed 0 is its best, re-registered as version 3
        "sparse-gan-oct-b": [_Version(1, 0), _Version(2, 1), _Version(3, 0)],
    })
    val = {"a": {0: 0.6, 1: 0.95}, "b": {0: 0.85, 1: 0.75}, "c": {0: 0.99}}  # c: not registered
    assert set_champion_(val, client) == ("b", 0)
    assert client.aliases == {("sparse-gan-oct-b", "champion"): "3"}

    # a row whose best seed has no version: its next best seed
    client = _Client({"sparse-gan-oct-e": [_Version(1, 1)]})
    assert set_champion_({"e": {0: 0.9, 1: 0.5}}, client) == ("e", 1)
    assert client.aliases == {("sparse-gan-oct-e", "champion"): "1"}

    client = _Client({})
    assert set_champion_({"c": {0: 0.99}}, client) is None and client.aliases == {}


def set_champion_(val, client):
    from sparsegan.serving import set_champion

    return set_champion(val, client=client)
