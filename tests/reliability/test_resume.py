"""Point 1, resume: a real training subprocess killed mid-epoch (SIGKILL) resumes from its last
checkpoint when re-run, and ends with exactly the model and scores of an uninterrupted run; the
MLflow run is the same one, with every epoch logged exactly once. A checkpoint of other params
is set aside, never resumed, never deleted. Checkpoints live outside DVC's outputs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reliability_helpers import (PYTHON, REPO, STAGES, make_processed, run_stage, stage_env,
                                 write_params)
from sparsegan.data.dataset import load_split
from sparsegan.scoring import score_images
from sparsegan.params import load_params
from sparsegan.checkpoint import load_trained
from sparsegan.train import train_model

# Runs stages/train.py exactly as DVC does, with each batch slowed down (which changes no number)
# and announced on stdout as "STEP <epoch> <step>", so that the test can kill it mid-epoch.
SLOW_TRAIN = r"""
import runpy, sys, time
import sparsegan.train as tr
batches, epoch = tr.iterate_batches, [0]
def slow(*args, **kwargs):
    epoch[0] += 1
    for step, x in enumerate(batches(*args, **kwargs), 1):
        print(f"STEP {epoch[0]} {step}", flush=True)
        time.sleep(0.05)
        yield x
tr.iterate_batches = slow
sys.argv = [sys.argv[2], sys.argv[1], "0"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _kill_mid_epoch(repo: Path, model: str, epoch: int, step: int, env: dict) -> str:
    """Start the stage, SIGKILL it when it reaches ``step`` of ``epoch``; its stdout so far."""
    proc = subprocess.Popen([PYTHON, "-c", SLOW_TRAIN, model, str(STAGES / "train.py")],
                            cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen, deadline = [], time.monotonic() + 90
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == f"STEP {epoch} {step}":
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "training too slow to reach the kill point"
        else:
            pytest.fail(f"training ended before the kill point:\n{''.join(seen)}")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def _reference(tmp_path: Path, model: str, params_file: Path) -> Path:
    """An uninterrupted run of the same params on the same arrays (in this process)."""
    ref = tmp_path / "reference"
    shutil.copytree(params_file.parent / "data", ref / "data")
    threads = torch.get_num_threads()
    try:
        train_model(model, 0, load_params(params_file), ref / "data/processed/raw",
                    ref / "models" / model / "s0", ref / "checkpoints" / model / "s0",
                    log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    return ref / "models" / model / "s0"


def _scores(model: str, params_file: Path, model_dir: Path, processed: Path) -> torch.Tensor:
    params = load_params(params_file)
    torch.manual_seed(0)
    detector = load_trained(model_dir, model=model).detector
    images, _, _ = load_split(processed, "val")
    by_score = score_images(detector, images, 8, torch.device("cpu"), keep_maps=False,
                            knobs=params.score)
    return torch.from_numpy(np.concatenate([s for s, _ in by_score.values()]))


@pytest.mark.parametrize("model,kill_epoch", [("sparse_gan", 3), ("fanogan", 4)])
def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted_run(tmp_path, guard, ledger,
                                                               mlflow_uri, model, kill_epoch):
    # sparse_gan: G + D + SRN, killed in epoch 3 of 4. fanogan: 3 WGAN-GP epochs (a G step every
    # 5th critic step, 6 steps an epoch: the critic step counter must survive) + 2 encoder epochs,
    # killed in epoch 4, the first encoder epoch.
    repo = tmp_path / "repo"
    params_file = write_params(repo)
    make_processed(repo)
    guard.protect(params_file, repo / "data")
    ledger.inputs(2)
    env = stage_env(MLFLOW_TRACKING_URI=mlflow_uri)
    checkpoint = repo / "checkpoints" / model / "s0" / "checkpoint.pt"
    model_dir = repo / "models" / model / "s0"

    out = _kill_mid_epoch(repo, model, kill_epoch, 3, env)
    ledger.faults()
    assert f"epoch {kill_epoch - 1}/" in out and f"epoch {kill_epoch}/" not in out
    killed = torch.load(checkpoint, weights_only=True)
    assert killed["epoch"] == kill_epoch - 1  # the last finished epoch, not a partial one
    assert not model_dir.exists()
    # a kill during the next checkpoint write would leave a partial .tmp: it must be ignored
    checkpoint.with_name("checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half-written")
    ledger.faults()

    done = run_stage("train", model, "0", cwd=repo, **{"MLFLOW_TRACKING_URI":
                                                     env["MLFLOW_TRACKING_URI"]})
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {kill_epoch - 1}" in done.stdout
    assert not checkpoint.exists()  # consumed once model.pt is saved

    # bit for bit: the same weights (incl. buffers such as critic_steps) and the same scores
    ref_dir = _reference(tmp_path, model, params_file)
    ours = torch.load(model_dir / "model.pt", weights_only=True)["model"]
    theirs = torch.load(ref_dir / "model.pt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    if model == "fanogan":
        assert int(ours["critic_steps"]) == 3 * 6
    processed = repo / "data/processed/raw"
    assert torch.equal(_scores(model, params_file, model_dir, processed),
                       _scores(model, params_file, ref_dir, processed))

    # MLflow: the resumed run is the killed one, every epoch logged exactly once, no orphan run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    record = json.loads((repo / f"reports/runs/train/{model}-s0.json").read_text())
    run_id = record["mlflow_run_id"]  # the stage's run record, outside the model's folder
    assert run_id == killed["mlflow_run_id"]
    assert len(record["epochs"]) == len(json.loads((model_dir / "history.json").read_text()))
    assert sorted(p.name for p in model_dir.iterdir()) == ["history.json", "model.pt"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # one training run (and its pipeline's parent run), no orphan
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 2 and run.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in runs}
    history = json.loads((model_dir / "history.json").read_text())
    n_epochs = len(history)
    if model == "sparse_gan":  # pix2pix's lr schedule (train.lr_decay 0.5 of 4 epochs) resumed
        lr = load_params(params_file).train.lr
        for name in ("generator", "discriminator"):
            assert [r[f"lr_{name}"] for r in history] == pytest.approx([lr, lr, lr * 2 / 3, lr / 3])
    for key in {k for row in history for k in row if k.startswith(("loss_", "lr_"))}:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        expected = [r["epoch"] for r in history if key in r]
        assert sorted(steps) == expected, (key, steps)
    assert [r["epoch"] for r in history] == list(range(1, n_epochs + 1))


def test_kill_between_checkpoint_and_mlflow_log_is_caught_up(tmp_path, guard, ledger,
                                                             monkeypatch, mlflow_uri):
    """Metrics are logged after the checkpoint; a run that died in between logs the missing
    epoch on resume (so every epoch is in MLflow exactly once)."""
    import mlflow

    import sparsegan.train as tr

    repo = tmp_path / "repo"
    params = load_params(write_params(repo, {"train": {"epochs": 3}}))
    make_processed(repo, n_train=16)
    guard.protect(repo)
    real_log = mlflow.log_metrics

    def die_at_epoch_2(metrics, step=None, **kw):
        if step == 2:
            raise KeyboardInterrupt  # the process dies right after checkpoint 2 was written
        return real_log(metrics, step=step, **kw)

    monkeypatch.setattr(mlflow, "log_metrics", die_at_epoch_2)
    args = ("autoencoder", 0, params, repo / "data/processed/raw", repo / "models/autoencoder",
            repo / "checkpoints/autoencoder", True, repo / "run.json")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train_model(*args)
        ledger.faults()
        assert torch.load(repo / "checkpoints/autoencoder/checkpoint.pt",
                          weights_only=True)["epoch"] == 2
        monkeypatch.setattr(mlflow, "log_metrics", real_log)
        history = tr.train_model(*args)
    finally:
        torch.set_num_threads(threads)
    run_id = json.loads((repo / "run.json").read_text())["mlflow_run_id"]
    steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss_re")]
    assert sorted(steps) == [1, 2, 3] == [r["epoch"] for r in history]


@pytest.mark.parametrize("change", ["params", "data"])
def test_checkpoint_of_other_params_or_data_is_set_aside_not_resumed_nor_deleted(
        tmp_path, guard, ledger, capsys, change):
    repo = tmp_path / "repo"
    make_processed(repo, n_train=16)
    old = load_params(write_params(repo, {"train": {"epochs": 3}}))
    ckpt_dir = repo / "checkpoints/autoencoder"
    args = (repo / "data/processed/raw", repo / "models/autoencoder", ckpt_dir)
    threads = torch.get_num_threads()
    try:
        import sparsegan.models.sparse_gan as sg
        real_step, calls = sg.ReconstructionDetector.train_step, [0]

        def stop_in_epoch_2(self, x, phase):  # Ctrl-C in epoch 2: checkpoint after epoch 1 stays
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt
            return real_step(self, x, phase)

        sg.ReconstructionDetector.train_step = stop_in_epoch_2
        try:
            with pytest.raises(KeyboardInterrupt):
                train_model("autoencoder", 0, old, *args, log_mlflow=False)
        finally:
            sg.ReconstructionDetector.train_step = real_step
        ledger.faults()
        checkpoint = ckpt_dir / "checkpoint.pt"
        old_bytes = checkpoint.read_bytes()
        capsys.readouterr()

        if change == "params":
            new = load_params(write_params(repo, {"train": {"epochs": 3, "lr": 0.0005}}))
        else:  # same file names, other pixels (e.g. the synthetic data's seed changed)
            new = old
            make_processed(repo, n_train=16, seed=1)
        guard.protect(checkpoint, repo / "data", repo / "params.yaml")
        ledger.inputs()
        history = train_model("autoencoder", 0, new, *args, log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    tag = "config" if change == "params" else "data"
    aside = list(ckpt_dir.glob(f"checkpoint.{tag}-*.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == old_bytes
    assert f"other {'params' if change == 'params' else 'training data'}" in err
    assert str(aside[0]) in err and "nothing deleted" in err
    assert [r["epoch"] for r in history] == [1, 2, 3]  # trained from scratch, not resumed


def test_checkpoints_live_outside_dvc_outputs(tmp_path, monkeypatch):
    """DVC deletes a stage's outs before re-running it; checkpoints/<model>/s<seed> is none of
    them (nor inside one), is ignored by git and DVC, and is where the train stage puts them."""
    from sparsegan.params import MODELS

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = []
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                for model in MODELS:
                    outs.append(Path(path.replace("${item.seed}", "0")
                                     .replace("${item.model}", model).replace("${key}", model)
                                     .replace("${item[0]}", model)))
    assert Path("models/sparse_gan/s0") in outs
    for model in MODELS:
        ck = Path("checkpoints") / model / "s0"
        for out in outs:
            assert ck != out and out not in ck.parents and ck not in out.parents, (ck, out)
    for ignore in (".gitignore", ".dvcignore"):
        assert "checkpoints/" in (REPO / ignore).read_text().split()

    import runpy
    stage = runpy.run_path(str(STAGES / "train.py"))
    seen = {}
    stage["main"].__globals__["train_model"] = lambda *a, **k: seen.update(args=a)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    stage["main"]("sparse_gan", "2")
    assert seen["args"][:2] == ("sparse_gan", 2)
    assert seen["args"][5] == Path("checkpoints/sparse_gan/s2")
    assert seen["args"][4] == Path("models/sparse_gan/s2")
