"""Data-parallel training (sparsegan/distributed.py) gives the single-process result.

The stage ``stages/train.py`` with ``runtime.nproc_per_node: 2`` re-launches itself under torchrun:
two CPU processes (gloo), each reading its shard of every shuffled batch (4 of the global 8),
the gradients averaged over the ranks in every optimizer step (the detectors' update path), rank
0 writing the checkpoint, the model and the MLflow run. Its model must equal the one of
``train_model`` in one process with the same global batch. Batch norm would normalise each rank's 4 images with their own statistics
(SyncBatchNorm exists on CUDA only), so the test uses ``model.norm: none``, where equality must
hold up to float rounding.

For every kind of detector (Sparse-GAN; AnoGAN and f-AnoGAN, whose per-rank z differ from a
single process's), 2 gloo ranks check that a detector given the ranks' gradient averaging (``average_gradients_with``) trains
like a plain one whose gradients are averaged over the ranks by hand before each optimizer step:
several forwards per backward, frozen networks, the SRN's dictionary used outside ``forward`` and
f-AnoGAN's gradient penalty (double backward) included.
Also unit checks of the sharding (DistributedSampler's rule) and of the loss averaging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sparsegan import distributed
from sparsegan.checkpoint import load_trusted
from sparsegan.data.dataset import iterate_batches, shard
from sparsegan.params import parse_params
from sparsegan.train import train_model

REPO = Path(__file__).resolve().parents[1]
MODEL = "sparse_gan"  # G + D + SRN: every kind of step the reconstruction models take
SEED = 3
PARAMS = {
    "data": {"image_size": 32},
    "model": {"base_channels": 4, "norm": "none"},
    "train": {"epochs": 2, "batch_size": 8},
    "runtime": {"num_threads": 1, "device": "cpu", "nproc_per_node": 2},
}
N_TRAIN = 24  # 3 global batches of 8 per epoch, 6 optimizer steps of G and of D


def _processed(root: Path) -> Path:
    out = root / "data" / "processed" / "raw"  # the variant every model reads by default
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32
    images = np.empty((N_TRAIN, 1, 32, 32), np.uint8)
    for i in range(N_TRAIN):
        f = rng.uniform(1, 4, 2)
        img = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx + rng.random()))
        images[i, 0] = np.clip((img + 0.05 * rng.standard_normal((32, 32))) * 255, 0, 255)
    np.save(out / "train.npy", images)
    pd.DataFrame({"path": [f"raw/{i}.jpeg" for i in range(N_TRAIN)], "label": 0,
                  "class": "NORMAL", "patient": [str(i) for i in range(N_TRAIN)], "mask": ""}
                 ).to_csv(out / "train.csv", index=False)
    return out


def test_two_cpu_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    repo = tmp_path / "repo"
    processed = _processed(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), MODEL, str(SEED)],
                          cwd=repo,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stderr  # the stage re-launched itself under torchrun
    # rank 0 reports the data-parallel training, once
    assert proc.stderr.count("data parallel over 2 processes") == 1, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    where = Path(MODEL) / f"s{SEED}"
    ddp = load_trusted(repo / "models" / where / "model.pt", "model", ("model",))["model"]
    history = json.loads((repo / "models" / where / "history.json").read_text())
    assert json.loads((repo / f"reports/runs/train/{MODEL}-s{SEED}.json").read_text())[
        "mlflow_run_id"]  # rank 0's run record
    assert not (repo / "checkpoints" / where / "checkpoint.pt").exists()

    # one process, the same global batch of 8, the same seed and shuffle
    params = parse_params({**PARAMS, "runtime": {**PARAMS["runtime"], "nproc_per_node": 1}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_history = train_model(MODEL, SEED, params, processed, tmp_path / "single",
                                     tmp_path / "ckpt", log_mlflow=False)
    finally:
        torch.set_num_threads(threads)
    single = load_trusted(tmp_path / "single" / "model.pt", "model", ("model",))["model"]

    init = _initial_state(params)
    assert ddp.keys() == single.keys()
    moved = 0.0
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp[key], value, atol=1e-5, rtol=1e-4, msg=key)
            moved = max(moved, float((value - init[key]).abs().max()))
    assert moved > 1e-3  # the runs trained (6 Adam steps at lr 1e-3), far beyond the tolerance
    for row, ref in zip(history, single_history, strict=True):  # global mean losses per epoch
        for k in ref:
            if k.startswith("loss_"):
                assert row[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


def _initial_state(params) -> dict:
    from sparsegan.models import build_detector
    torch.manual_seed(SEED)
    return build_detector(MODEL, params, 32).state_dict()


def test_shards_partition_every_global_batch_like_distributed_sampler():
    order = np.random.default_rng(0).permutation(10)
    shards = [shard(order, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to 12 by repeating the start
    assert sorted(np.concatenate(shards).tolist()) == sorted(order.tolist() + order[:2].tolist())
    sampler = torch.utils.data.DistributedSampler(range(10), num_replicas=3, rank=1,
                                                  shuffle=False)
    assert [order[i] for i in sampler] == shards[1].tolist()
    images = np.arange(16, dtype=np.uint8).repeat(4).reshape(16, 1, 2, 2)
    whole = [set(i.tolist()) for _, i in iterate_batches(
        images, 8, True, torch.Generator().manual_seed(1), return_index=True)]
    parts = [[set(i.tolist()) for _, i in iterate_batches(
        images, 4, True, torch.Generator().manual_seed(1), return_index=True, rank=r,
        world_size=2)] for r in range(2)]
    assert whole == [a | b for a, b in zip(*parts, strict=True)]


def test_per_rank_batch_needs_a_divisible_global_batch():
    assert distributed.per_rank_batch(32, distributed.DistInfo(0, 4, 0)) == 8
    with pytest.raises(ValueError, match="divisible"):
        distributed.per_rank_batch(30, distributed.DistInfo(0, 4, 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_worker(rank: int, port: int) -> distributed.DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, _ = distributed.setup(torch.device("cpu"))
    return info


def _loss_worker(rank: int, port: int, out: str) -> None:
    info = _setup_worker(rank, port)
    losses = distributed.mean_losses({"a": float(rank), "b": 2.0}, info)
    torch.save(losses, f"{out}/{rank}.pt")
    distributed.teardown()


def test_losses_are_averaged_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_loss_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"{rank}.pt") == {"a": 0.5, "b": 2.0}


# model -> its phases
DDP_MODELS = {
    "sparse_gan": ["generator"] * 3,
    "anogan": ["gan"] * 3,
    # n_critic 2: G steps at critic steps 2 and 4; then the encoder phase (G and critic frozen)
    "fanogan": ["gan"] * 4 + ["encoder"] * 2,
}
# batch norm (the default) included: per-rank statistics, for both detectors alike
DDP_PARAMS = {"model": {"base_channels": 4, "norm": "batch"},
              "train": {"lr": 1e-3}, "anogan": {"latent_dim": 8, "lr": 1e-3},
              "fanogan": {"latent_dim": 8, "lr": 1e-3, "n_critic": 2}}


def _average_gradients(optimizer, args, kwargs) -> None:
    """The reference: each rank's gradients averaged over the ranks by hand before the step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(2)


def _model_worker(rank: int, port: int, out: str) -> None:
    from sparsegan.models import build_detector

    info = _setup_worker(rank, port)
    params = parse_params(DDP_PARAMS)
    device = torch.device("cpu")
    result = {}
    for model, phases in DDP_MODELS.items():
        torch.manual_seed(5)
        distributed_ = distributed.prepare_model(build_detector(model, params, 32), device, info)
        distributed_.average_gradients_with(  # what the trainer gives it under torchrun
            lambda params, loss: distributed.average_gradients(params, loss, info))
        torch.manual_seed(5)
        reference = distributed.prepare_model(build_detector(model, params, 32), device, info)
        initial = {k: v.clone() for k, v in reference.state_dict().items()}
        for opt in reference.optimizers().values():
            opt.register_step_pre_hook(_average_gradients)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own images
        for step, phase in enumerate(phases):
            x = torch.rand(4, 1, 32, 32, generator=data) * 2 - 1
            for detector in (distributed_, reference):
                torch.manual_seed(1000 * step + rank)  # the same per-rank z, alpha for both
                losses = detector.train_step(x, phase)
        result[model] = {
            "losses": losses, "parameters": [n for n, _ in distributed_.named_parameters()],
            "ddp": distributed_.state_dict(), "reference": reference.state_dict(),
            "initial": initial}
    torch.save(result, f"{out}/{rank}.pt")
    distributed.teardown()


def test_every_model_trains_like_hand_averaged_gradients(tmp_path):
    torch.multiprocessing.spawn(_model_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for model in DDP_MODELS:
        for got in ranks:
            ddp, reference = got[model]["ddp"], got[model]["reference"]
            assert ddp.keys() == reference.keys()
            moved = 0.0
            for key, value in reference.items():
                if value.is_floating_point():
                    torch.testing.assert_close(ddp[key], value, atol=1e-6, rtol=1e-5,
                                               msg=f"{model} {key}")
                    moved = max(moved, float((value - got[model]["initial"][key]).abs().max()))
                else:
                    assert torch.equal(ddp[key], value), (model, key)
            assert moved > 1e-3, model  # it trained, far beyond the tolerance
        # the ranks saw different images, yet hold the same parameters: the gradients were
        # averaged (without it the replicas would drift apart); BN statistics are per rank
        assert any("running_mean" in key for key in ranks[0][model]["ddp"]), model
        first, second = ranks[0][model]["ddp"], ranks[1][model]["ddp"]
        for key in ranks[0][model]["parameters"]:
            torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=1e-5,
                                       msg=f"{model} {key}")
        assert ranks[0][model]["losses"] != ranks[1][model]["losses"], model


def _diverge_worker(rank: int, port: int, out: str) -> None:
    from sparsegan.models import build_detector
    from sparsegan.models.base import Diverged

    info = _setup_worker(rank, port)
    params = parse_params({"model": {"base_channels": 4, "norm": "none"}})
    torch.manual_seed(0)
    detector = build_detector("autoencoder", params, 32)
    detector.average_gradients_with(lambda params, loss: distributed.average_gradients(
        params, loss, info))
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    if rank == 1:
        x[0, 0, 0, 0] = float("nan")  # one rank's batch poisons its loss
    try:
        detector.train_step(x, "generator")
        raised = ""
    except Diverged as exc:
        raised = str(exc)
    unchanged = all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    torch.save({"raised": raised, "unchanged": unchanged}, f"{out}/{rank}.pt")
    distributed.teardown()


def test_a_nan_on_one_rank_stops_every_rank_before_the_step(tmp_path):
    torch.multiprocessing.spawn(_diverge_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["raised"] == "the generator step's loss is nan", (rank, got)
        assert got["unchanged"], rank  # no optimizer step was taken on either rank
