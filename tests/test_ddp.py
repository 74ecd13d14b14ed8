"""Data-parallel training (sparsegan/distributed.py) gives the single-process result.

The stage ``stages/train.py`` with ``train.nproc_per_node: 2`` re-launches itself under torchrun:
two CPU processes (gloo), each reading its shard of every shuffled batch (4 of the global 8),
gradients averaged before every optimizer step, rank 0 writing the checkpoint, the model and the
MLflow run. Its model must equal the one of ``train_variant`` in one process with the same global
batch. Batch norm would normalise each rank's 4 images with their own statistics (SyncBatchNorm
exists on CUDA only), so the test uses ``model.norm: none``, where equality must hold up to float
rounding. Also unit checks of the sharding (DistributedSampler's rule) and of the gradient hook.
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
from sparsegan.data.dataset import iterate_batches
from sparsegan.params import parse_params
from sparsegan.train import load_trusted, train_variant

REPO = Path(__file__).resolve().parents[1]
VARIANT = "sparse_gan"  # G + D + SRN: every kind of step the reconstruction variants take
PARAMS = {
    "seed": 3,
    "data": {"image_size": 32},
    "model": {"base_channels": 4, "norm": "none"},
    "train": {"epochs": 2, "batch_size": 8, "num_threads": 1, "device": "cpu",
              "nproc_per_node": 2},
}
N_TRAIN = 24  # 3 global batches of 8 per epoch, 6 optimizer steps of G and of D


def _processed(root: Path) -> Path:
    out = root / "data" / "processed"
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
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py"), VARIANT], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stderr  # the stage re-launched itself under torchrun
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone reports
    ddp = load_trusted(repo / "models" / VARIANT / "model.pt", "model", ("model",))["model"]
    history = json.loads((repo / "models" / VARIANT / "history.json").read_text())
    assert json.loads((repo / "models" / VARIANT / "mlflow_run.json").read_text())["run_id"]
    assert not (repo / "checkpoints" / VARIANT / "checkpoint.pt").exists()

    # one process, the same global batch of 8, the same seed and shuffle
    params = parse_params({**PARAMS, "train": {**PARAMS["train"], "nproc_per_node": 1}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_history = train_variant(VARIANT, params, processed, tmp_path / "single",
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
    torch.manual_seed(params.seed)
    return build_detector(VARIANT, params, 32).state_dict()


def test_shards_partition_every_global_batch_like_distributed_sampler():
    order = np.random.default_rng(0).permutation(10)
    shards = [distributed.shard(order, r, 3) for r in range(3)]
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


def _hook_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    info, _ = distributed.setup(torch.device("cpu"))
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    distributed.sync_gradients([opt], info)
    w.grad = torch.full((3,), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
    opt.step()
    losses = distributed.mean_losses({"a": float(rank)}, info)
    torch.save({"w": w.detach(), "loss": losses["a"]}, f"{out}/{rank}.pt")
    distributed.teardown()


def test_gradient_hook_averages_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_hook_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["w"], torch.full((3,), -1.5)) and got["loss"] == 0.5
