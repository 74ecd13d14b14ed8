"""End to end: `dvc repro` of the whole pipeline on tiny synthetic data, in a temporary copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]  # two training seeds: the report's mean and spread, one train stage per seed
ROWS = ["autoencoder", "anogan", "fanogan", "pix2pix_image", "pix2pix_latent", "sparse_gan",
        "autoencoder_latent", "sparse_gan_image"]
MODELS = ["autoencoder", "pix2pix", "sparse_gan", "anogan", "fanogan"]  # sparsegan/spec.py's

TINY = {
    "seeds": SEEDS,
    "data": {"image_size": 32,
             "synthetic": {"train_normal": 48, "train_per_disease": 12, "test_per_class": 8,
                           "scans_per_patient": 2, "workers": 1},
             "split": {"val_normal": 8, "val_per_disease": 4}},
    "preprocess": {"workers": 1},
    "model": {"base_channels": 4},
    "train": {"epochs": 1, "batch_size": 16},
    "runtime": {"num_threads": 1},
    "anogan": {"epochs": 1},
    "fanogan": {"epochs": 1, "encoder_epochs": 1, "n_critic": 2},
    "score": {"anogan": {"search_steps": 3}},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(cwd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _copy_repo(work: Path, params: dict) -> None:
    for name in ("sparsegan", "stages"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _repro(work: Path) -> None:
    """A git repository with a first commit and DVC in ``work``, then ``dvc repro`` (its output
    in ``work/repro.log``)."""
    _run(["git", "init", "-q"], work)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
          "-m", "init"], work)
    _run([sys.executable, "-m", "dvc", "init", "-q"], work)
    (work / "repro.log").write_text(_run([sys.executable, "-m", "dvc", "repro"], work))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    _copy_repo(work, _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))
    _repro(work)
    return work


def _status(work: Path) -> dict:
    return json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], work)
                      .strip().splitlines()[-1])


def _set(work: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    node = params
    for part in section.split("."):
        node = node[part]
    node[key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_writes_mean_spread_and_per_seed_metrics_for_every_row(pipeline: Path):
    metrics = json.loads((pipeline / "reports/metrics.json").read_text())
    assert list(metrics) == ROWS
    for row, m in metrics.items():
        assert m["n_seeds"] == 2 and sorted(m["seeds"]) == ["0", "1"]
        for seed in SEEDS:
            s = m["seeds"][str(seed)]
            for key in ("val_auc", "test_auc", "test_accuracy", "test_sensitivity"):
                assert 0.0 <= s[key] <= 1.0, (row, seed, key, s[key])
            # phi comes from that seed's validation calibration
            cal = json.loads((pipeline / f"reports/rows/{row}/calibration/s{seed}.json")
                             .read_text())
            assert cal["row"] == row and cal["seed"] == seed
            assert s["phi"] == cal["phi"] and s["val_auc"] == cal["validation"]["auc"]
        # the top level is the mean over the seeds, the spread their sd / min / max
        for key in ("val_auc", "test_auc", "phi"):
            values = [m["seeds"][str(seed)][key] for seed in SEEDS]
            assert m[key] == pytest.approx(sum(values) / 2)
            assert m["spread"][key]["sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
            assert m["spread"][key]["min"] == min(values) and m["spread"][key]["max"] == max(values)
    for row in ("pix2pix_latent", "sparse_gan", "autoencoder_latent"):  # the latent score's maps
        assert 0.0 <= metrics[row]["pixel_auroc_aam"] <= 1.0
        assert 0.0 <= metrics[row]["pixel_auroc_aam_residual"] <= 1.0
    for row in ROWS:
        if row != "sparse_gan":
            assert 0.0 <= metrics[row]["vs_sparse_gan_p_value"] <= 1.0
            assert metrics[row]["vs_sparse_gan_seeds_won"] in (0, 1, 2)
    table = (pipeline / "reports/table1.md").read_text()
    assert "Sparse-GAN" in table and "0.925" in table  # the paper's number beside ours
    assert "sparse_gan_image (ablation)" in table and "over 2 training seeds" in table
    html = (pipeline / "reports/index.html").read_text()
    assert html.count('data-row="') >= len(ROWS) and "https://" not in html
    for seed in SEEDS:  # the score stage's throughput: its run record, not a score output
        run = json.loads((pipeline / f"reports/runs/score/autoencoder-s{seed}.json").read_text())
        assert run["test_images_per_s"] > 0


def test_pix2pix_1_and_2_are_scored_from_one_trained_model(pipeline: Path):
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    assert sorted(s for s in lock if s.startswith("train_")) == sorted(
        f"train_{m}@{seed}" for m in MODELS for seed in SEEDS)
    for row, score in (("pix2pix_image", "image"), ("pix2pix_latent", "latent")):
        deps = [d["path"] for d in lock[f"calibrate@{row}"]["deps"]]
        assert "scores/pix2pix" in deps
        for seed in SEEDS:
            cal = json.loads((pipeline / f"reports/rows/{row}/calibration/s{seed}.json")
                             .read_text())
            assert (cal["model"], cal["score"]) == ("pix2pix", score)
    # one score stage per seed wrote both scores of the one model
    for seed in SEEDS:
        outs = [o["path"] for o in lock[f"score@pix2pix-{seed}"]["outs"]]
        assert sorted(outs) == [f"reports/runs/score/pix2pix-s{seed}.json",  # its run record
                                f"scores/pix2pix/s{seed}"]
        for score in ("image", "latent"):
            assert (pipeline / f"scores/pix2pix/s{seed}/{score}/test.csv").is_file()
    assert sorted(p.name for p in (pipeline / "models/pix2pix").iterdir()) == ["s0", "s1"]



def test_a_scale_arm_is_read_from_the_workspace_of_its_experiment(pipeline: Path):
    """What `scripts/scale.py run` records of an arm, read from a workspace of this layout."""
    from sparsegan.studies import scale

    rec = scale.read_arm(pipeline, "e60", SEEDS)
    assert rec["n_train"] == 48 - 8 and rec["image_size"] == 32 and rec["base_channels"] == 4
    assert rec["baselines"]["variant"] == {"anogan": "raw", "fanogan": "raw"}
    for row in scale.RECONSTRUCTION_ROWS:
        for seed in SEEDS:
            cal = json.loads((pipeline / f"reports/rows/{row}/calibration/s{seed}.json")
                             .read_text())
            assert rec["rows"][row]["val_auc"][str(seed)] == cal["validation"]["auc"]
            by_class = rec["rows"][row]["val_auc_by_class"][str(seed)]
            assert sorted(by_class) == ["CNV", "DME", "DRUSEN"]
            assert all(c["n"] == 4 and c["low"] <= c["auc"] <= c["high"] for c in by_class.values())
    for model in ("autoencoder", "pix2pix", "sparse_gan"):
        run = json.loads((pipeline / f"reports/runs/train/{model}-s0.json").read_text())
        assert rec["models"][model]["train_s"]["0"] == pytest.approx(
            sum(e["seconds"] for e in run["epochs"]))
        assert rec["models"][model]["train_flops"] > 0

def test_mlflow_runs_parent_children_and_numbers(pipeline: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sparse-gan-oct")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the report names the page of these runs in the model-training view
    assert (f"127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            in (pipeline / "repro.log").read_text())
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (parent,) = parents  # one parent run per pipeline run
    assert parent.info.run_name.startswith("commit ")
    children = {(r.data.tags["model"], int(r.data.tags["seed"])): r for r in runs
                if r is not parent}
    assert sorted(children) == sorted((m, s) for m in MODELS for s in SEEDS)
    metrics = json.loads((pipeline / "reports/metrics.json").read_text())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"index.html", "table1.md", "metrics.json"} <= artifacts
    assert parent.data.metrics["autoencoder.vs_sparse_gan_p_value"] == pytest.approx(
        metrics["autoencoder"]["vs_sparse_gan_p_value"])
    for (model, seed), run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"{model} s{seed} {parent.info.run_name}"
        assert run.data.params["seed"] == str(seed) and run.data.params["model"] == model
        assert run.data.tags["git_commit"] != "unknown"
        assert "loss_g" in run.data.metrics or "loss_d" in run.data.metrics
        (data,) = run.inputs.dataset_inputs  # the training arrays, with their digest
        assert data.dataset.name == "train (synthetic)" and data.dataset.digest
        # the child run holds the test metrics of every row scored from this model and seed
        mine = [row for row in ROWS if json.loads(
            (pipeline / f"reports/rows/{row}/calibration/s{seed}.json").read_text())["model"] == model]
        assert mine
        for row in mine:
            assert run.data.metrics[f"{row}.test_auc"] == pytest.approx(
                metrics[row]["seeds"][str(seed)]["test_auc"])
    # the pix2pix child run carries both of Table 1's pix2pix rows
    assert {"pix2pix_image.test_auc", "pix2pix_latent.test_auc"} <= set(
        children[("pix2pix", 0)].data.metrics)
    # one registered screening model per row, one version per seed; champion: best mean val AUC
    assert {m.name for m in client.search_registered_models()} == {
        f"sparse-gan-oct-{r}" for r in ROWS}
    versions = client.search_model_versions("name = 'sparse-gan-oct-sparse_gan'")
    assert sorted(v.tags["seed"] for v in versions) == ["0", "1"]
    calibration = json.loads((pipeline / "reports/rows/sparse_gan/calibration/s0.json")
                             .read_text())  # the map shown: chosen on validation lesion masks
    assert calibration["map"] == max(calibration["val_pixel_auroc"],
                                     key=calibration["val_pixel_auroc"].get)
    assert "patient" in calibration and "test_patient_auc" in metrics["sparse_gan"]
    best = max(ROWS, key=lambda r: metrics[r]["val_auc"])
    seed = max(SEEDS, key=lambda s: metrics[best]["seeds"][str(s)]["val_auc"])
    champion = client.get_model_version_by_alias(f"sparse-gan-oct-{best}", "champion")
    assert champion.tags["seed"] == str(seed)
    assert client.get_run(parent.info.run_id).data.tags["champion"] == f"{best} s{seed}"


def test_a_scoring_change_rescores_without_retraining(pipeline: Path):
    _set(pipeline, "score.anogan", "search_steps", 4)
    status = _status(pipeline)
    assert status and not any(stage.startswith("train_") for stage in status), status
    assert "score@anogan-0" in status and "score@anogan-1" in status
    _set(pipeline, "score.anogan", "search_steps", TINY["score"]["anogan"]["search_steps"])
    assert not any(stage.startswith("score@") for stage in _status(pipeline))


def test_a_models_processed_variant_re_trains_that_model_only(pipeline: Path):
    """preprocess.variant.anogan=filled: AnoGAN trains on data/processed/filled (already made by
    the preprocess stage, which does not re-run); no other model is out of date."""
    _set(pipeline, "preprocess.variant", "anogan", "filled")
    status = _status(pipeline)
    assert set(status) == {"train_anogan@0", "train_anogan@1"}, status
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    filled = next(o for o in lock["preprocess"]["outs"] if o["path"] == "data/processed/filled")
    raw = next(o for o in lock["preprocess"]["outs"] if o["path"] == "data/processed/raw")
    assert filled["md5"] != raw["md5"]  # the synthetic scans have registration corners
    _set(pipeline, "preprocess.variant", "anogan", "raw")
    assert not _status(pipeline)


def test_changing_lambda_sp_reruns_only_sparse_gan(pipeline: Path):
    _set(pipeline, "train", "lambda_sp", 5.0)
    status = _status(pipeline)
    assert set(status) == {"train_sparse_gan@0", "train_sparse_gan@1"}, status
    out = _run([sys.executable, "-m", "dvc", "repro"], pipeline)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"train_sparse_gan@0", "train_sparse_gan@1", "score@sparse_gan-0",
                   "score@sparse_gan-1", "calibrate@sparse_gan", "calibrate@sparse_gan_image",
                   "evaluate@sparse_gan", "evaluate@sparse_gan_image", "report"}


def test_a_stage_run_twice_gives_the_same_output_hashes(pipeline: Path):
    """Outputs are functions of their inputs: forced re-runs of preprocess, a training and a
    scoring give byte-identical outputs (the same DVC hashes), so nothing after them re-runs;
    their timings and MLflow runs are in reports/runs, which no stage reads."""
    stages = ("preprocess", "train_autoencoder@0", "score@autoencoder-0")

    def hashes() -> dict:
        lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
        return {s: [o["md5"] for o in lock[s]["outs"]
                    if not o["path"].startswith("reports/runs/")] for s in stages}

    before = hashes()
    for stage in stages:
        _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], pipeline)
    assert hashes() == before
    assert not _status(pipeline)  # nothing downstream is out of date


# A model added as docs/design.md says: its module, its spec entry, its params section
# (dataclass and params.yaml), its rows; then `python -m sparsegan.spec` writes its stages.
TOY_MODULE = """\"\"\"A toy model: one strided conv and its transpose, trained on the MSE.\"\"\"

import torch
from torch import nn

from .base import Detector


class Toy(Detector):
    name = "toy"

    def __init__(self, image_size, p):
        super().__init__()
        self.p = p
        self.encoder = nn.Sequential(nn.Conv2d(1, p.channels, 4, 2, 1), nn.Tanh())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(p.channels, 1, 4, 2, 1), nn.Tanh())

    def make_optimizers(self):
        return {"g": torch.optim.Adam(self.parameters(), lr=self.p.lr)}

    def phases(self):
        return ["fit"] * self.p.epochs

    def train_step(self, x, phase):
        return {"g": self.update("g", ((self.decoder(self.encoder(x)) - x) ** 2).mean())}


def build(name, params, image_size):
    return Toy(image_size, params.toy)
"""
TOY_PARAMS = """@dataclass(frozen=True)
class ToyParams:
    channels: int = _check(ge=1, default=4)
    epochs: int = _check(ge=1, default=2)
    lr: float = _check(gt=0.0, default=0.01)


"""
TOY_SPEC = """    ModelSpec("toy", "toy", "toy", "sparsegan.params:ToyParams", ("train.batch_size", "toy"),
              "reconstruction", ("image", "latent"), {"toy": "image", "toy_latent": "latent"}),
)
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A copy of the repository with the toy model added through the spec, reproduced."""
    work = tmp_path_factory.mktemp("toy")
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                    {**TINY, "seeds": [0], "toy": {"channels": 3, "epochs": 2}})
    params["rows"] = {"autoencoder": ["autoencoder", "image"], "toy": ["toy", "image"],
                      "toy_latent": ["toy", "latent"]}
    _copy_repo(work, params)
    (work / "sparsegan/models/toy.py").write_text(TOY_MODULE)
    marker = "# dataclass goes here, beside the others.\n\n\n"
    text = (work / "sparsegan/params.py").read_text()
    (work / "sparsegan/params.py").write_text(text.replace(marker, marker + TOY_PARAMS))
    text = (work / "sparsegan/spec.py").read_text()
    (work / "sparsegan/spec.py").write_text(text.replace("\n)\n\n# Table 1", "\n" + TOY_SPEC
                                                         + "\n# Table 1", 1))
    # the spec command names the one params.yaml key DVC needs for it, then writes its stages
    proc = subprocess.run([sys.executable, "-m", "sparsegan.spec"], cwd=work, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(work)})
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: params.yaml: add preprocess.variant.toy: raw (raw | filled: the processed data "
        "its train stage reads)"), proc.stderr
    params["preprocess"]["variant"]["toy"] = "raw"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([sys.executable, "-m", "sparsegan.spec"], work)
    _repro(work)
    return work


def test_a_model_added_through_the_spec_is_trained_scored_calibrated_evaluated_reported(toy):
    spec = yaml.safe_load((toy / "dvc.yaml").read_text())["stages"]
    assert spec["train_toy"]["params"] == ["runtime", "preprocess.variant.toy", "train.batch_size",
                                           "toy"]
    assert "toy" in spec["score"]["matrix"]["model"]
    history = json.loads((toy / "models/toy/s0/history.json").read_text())
    assert [h["phase"] for h in history] == ["fit", "fit"]  # params.yaml's toy.epochs
    metrics = json.loads((toy / "reports/metrics.json").read_text())
    assert list(metrics) == ["autoencoder", "toy", "toy_latent"]
    for row in ("toy", "toy_latent"):
        assert 0.0 <= metrics[row]["test_auc"] <= 1.0 and 0.0 <= metrics[row]["val_auc"] <= 1.0
        assert metrics[row]["test_auc"] != metrics["autoencoder"]["test_auc"]
    assert "toy (ablation)" in (toy / "reports/table1.md").read_text()


def test_a_model_without_its_params_section_stops_with_one_line_naming_it(toy, tmp_path):
    params = yaml.safe_load((toy / "params.yaml").read_text())
    del params["toy"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(toy)}
    proc = subprocess.run([sys.executable, str(toy / "stages/train.py"), "toy", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no toy: section" in lines[0] and "model toy" in lines[0], lines
