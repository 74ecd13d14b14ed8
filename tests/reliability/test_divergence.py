"""Point 2, divergence: a NaN/Inf loss stops training, before that optimizer step
(``Detector.update``), with an error naming model, seed, step, epoch and batch; the last good
checkpoint is kept unchanged (and still resumes); the stage CLI turns the
error into one line on stderr and exit code 2."""

from __future__ import annotations

import hashlib

import pytest
import torch

import sparsegan.models.sparse_gan as sg
from reliability_helpers import error_line, make_processed, run_stage, write_params
from sparsegan.models import build_detector
from sparsegan.params import load_params
from sparsegan.train import train_model


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_with_model_epoch_step_and_keeps_last_checkpoint(tmp_path, guard,
                                                                        ledger, monkeypatch):
    repo = tmp_path / "repo"
    params = load_params(write_params(repo, {"train": {"epochs": 3}}))
    make_processed(repo, n_train=24)  # 3 steps an epoch
    guard.protect(repo)
    checkpoint = repo / "checkpoints/sparse_gan/checkpoint.pt"
    real_step, calls, at_fault = sg.ReconstructionDetector.train_step, [0], {}

    def poisoned(self, x, phase):  # step 2 of epoch 2 gets a NaN pixel: a real NaN loss follows
        calls[0] += 1
        if calls[0] == 5:
            at_fault["sha"] = _sha(checkpoint)  # the checkpoint after epoch 1, as it is now
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return real_step(self, x, phase)

    monkeypatch.setattr(sg.ReconstructionDetector, "train_step", poisoned)
    args = ("sparse_gan", 0, params, repo / "data/processed/raw", repo / "models/sparse_gan",
            repo / "checkpoints/sparse_gan")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(FloatingPointError) as info:
            train_model(*args, log_mlflow=False)
        ledger.faults()
        message = str(info.value)
        assert "[train sparse_gan s0]" in message and "epoch 2, step 2" in message
        # the first step on the NaN batch (D's) is refused, before it changes anything
        assert "the discriminator step's loss is nan" in message
        assert "nan" in message and str(checkpoint) in message and "\n" not in message
        # the last good checkpoint: unchanged since before the fault, loads, finite weights
        assert _sha(checkpoint) == at_fault["sha"]
        state = torch.load(checkpoint, weights_only=True)
        assert state["epoch"] == 1 and len(state["history"]) == 1
        detector = build_detector("sparse_gan", params, 32)
        detector.load_state_dict(state["model"])
        assert all(torch.isfinite(p).all() for p in detector.state_dict().values()
                   if p.is_floating_point())
        assert not (repo / "models/sparse_gan").exists()

        # the fault was transient: re-running with the same params resumes after epoch 1
        monkeypatch.setattr(sg.ReconstructionDetector, "train_step", real_step)
        history = train_model(*args, log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert (repo / "models/sparse_gan/model.pt").is_file()


def test_inf_loss_is_caught_too(tmp_path, guard, ledger, monkeypatch):
    repo = tmp_path / "repo"
    params = load_params(write_params(repo, {"train": {"epochs": 2}}))
    make_processed(repo, n_train=16)
    guard.protect(repo)
    real_loss = sg.reconstruction_loss
    monkeypatch.setattr(sg, "reconstruction_loss",
                        lambda x, rec: real_loss(x, rec) * float("inf"))  # an infinite L_re
    threads = torch.get_num_threads()
    try:
        with pytest.raises(FloatingPointError, match=r"autoencoder s3\] .*the generator step's "
                                                     r"loss is inf at epoch 1, step 1"):
            train_model("autoencoder", 3, params, repo / "data/processed/raw",
                        repo / "models/autoencoder", repo / "checkpoints/autoencoder",
                        log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    ledger.faults()
    assert torch.load(repo / "checkpoints/autoencoder/checkpoint.pt",
                      weights_only=True)["epoch"] == 0


def test_stage_cli_reports_divergence_in_one_line_exit_2(tmp_path, guard, ledger, mlflow_uri):
    """train.lr = 1e30 makes the real sparse_gan training blow up in its first step."""
    repo = tmp_path / "repo"
    write_params(repo, {"train": {"lr": 1e30, "epochs": 2}})
    make_processed(repo, n_train=16)
    guard.protect(repo)
    ledger.faults()
    res = run_stage("train", "sparse_gan", "0", cwd=repo, MLFLOW_TRACKING_URI=mlflow_uri)
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    assert line.startswith("error: [train sparse_gan s0] training diverged: the ")
    assert "at epoch 1, step 1" in line and "Lower train.lr" in line
    assert torch.load(repo / "checkpoints/sparse_gan/s0/checkpoint.pt",
                      weights_only=True)["epoch"] == 0
    assert not (repo / "models").exists()
