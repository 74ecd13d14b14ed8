"""Data-parallel training on several GPUs (or CPU processes) under ``torchrun``.

``train.nproc_per_node: N`` (N > 1) makes ``stages/train.py`` re-launch itself through
``python -m torch.distributed.run --standalone --nproc_per_node N`` (:func:`relaunch`), so that
``dvc repro`` trains on N processes; running the stage under ``torchrun`` yourself works too.
Each process then:

* joins the process group (:func:`setup`): NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
  gloo on CPU;
* reads its own shard of each epoch's shuffled order, as ``DistributedSampler`` does
  (:func:`shard`, used by :func:`sparsegan.data.dataset.iterate_batches`): every rank draws the
  same permutation from the same seeded generator, pads it to a multiple of N by repeating its
  start, and takes every N-th index from its rank on. ``train.batch_size`` stays the **global**
  batch (the paper's 32 whatever N is), each rank takes ``batch_size / N`` of it, so the union of
  the ranks' step-k batches is exactly the single-process step-k batch;
* averages the gradients of every optimizer over the ranks right before each ``opt.step()``
  (:func:`sync_gradients`: one coalesced ``all_reduce`` per optimizer step, registered as an
  optimizer step pre-hook), so all replicas take the same step and stay identical;
* logs, checkpoints and talks to MLflow on rank 0 only (:attr:`DistInfo.is_main`); losses are
  averaged over the ranks (:func:`mean_losses`) so that the logged epoch means are the global
  ones and a NaN on any rank stops every rank at the same step.

**Why not wrap the networks in ``DistributedDataParallel``.** Our detectors own their optimizers
and call ``backward`` themselves, several times per ``train_step`` (a D step, then a G step); D
runs two or three forwards per backward and is frozen during the G step (its parameters get no
gradient, which DDP reports as an error unless ``find_unused_parameters`` / ``no_sync`` are
juggled per variant); f-AnoGAN's gradient penalty needs a double backward, which DDP does not
support (pytorch/pytorch#47562, #63929); and the wrapper would rename every key of the
checkpoints (``module.``). Averaging the gradients of each optimizer before its step is what DDP
computes (sum of the per-rank mean-loss gradients divided by N), works for every variant
unchanged, and keeps ``state_dict`` keys as they are. What it gives up is DDP's overlap of the
all-reduce with the backward pass: one all-reduce of the parameters' size per optimizer step
(about 2 ms for Sparse-GAN's ~60 M parameters at the paper's width over NVLink), a few percent of
a step on one node.

**Batch norm.** On CUDA every ``BatchNorm`` becomes ``SyncBatchNorm``
(:func:`prepare_model`), so the statistics are those of the global batch, as on one GPU.
``SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo) each rank normalises with its own
``batch_size / N`` images and keeps its own running statistics; rank 0's are the ones saved.
Training is then not identical to one process (smaller BN batches); ``model.norm: none`` removes
batch norm from the generator (``tests/test_ddp.py`` uses it to check that N CPU processes give
the single-process parameters).

**Randomness.** Model weights are initialised from ``seed`` on every rank and broadcast from
rank 0. The sampling that the GAN baselines do during training (AnoGAN's and f-AnoGAN's z, the
gradient penalty's interpolation weights) must differ per rank, so with N > 1 each epoch
re-seeds torch with :func:`epoch_seed` ``(seed, epoch, rank)``: a resumed distributed run draws
the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Set by torchrun (torch.distributed.run) in every process it starts.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, checkpoints and writes the model."""
        return self.rank == 0


def env_info() -> DistInfo:
    """The rank and world size torchrun gave this process (``DistInfo()`` outside torchrun)."""
    if not all(k in os.environ for k in _TORCHRUN_ENV):
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                    local_rank=int(os.environ["LOCAL_RANK"]))


def under_torchrun() -> bool:
    return all(k in os.environ for k in _TORCHRUN_ENV)


def relaunch(script: str, args: list[str], nproc: int, device_type: str) -> int:
    """Run ``script args`` under ``torch.distributed.run --standalone --nproc_per_node nproc``
    (a free rendezvous port on this machine) and return its exit code.

    On CPU each process gets ``cpu_count // nproc`` intra-op threads (torchrun would give it one)
    unless ``OMP_NUM_THREADS`` is set already."""
    env = dict(os.environ)
    if device_type != "cuda" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", script, *args]
    print(f"[distributed] launching {nproc} processes: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=env)


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on CPU); returns this
    process's :class:`DistInfo` and its device (``cuda:LOCAL_RANK`` on CUDA). A no-op outside
    torchrun or with one process."""
    info = env_info()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        if torch.cuda.device_count() <= info.local_rank:
            raise RuntimeError(f"rank {info.rank}: LOCAL_RANK {info.local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible; lower "
                               f"train.nproc_per_node")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    global _owned
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        _owned = True
    return info, device


_owned = False  # whether setup() created the process group (teardown() destroys only that one)


def teardown() -> None:
    """Leave the process group that :func:`setup` created (one created by the caller stays)."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of ``order`` (an epoch's indices), as ``DistributedSampler`` with
    ``drop_last=False``: pad to a multiple of ``world_size`` by repeating the start, then every
    ``world_size``-th index from ``rank``. All ranks get the same number of indices."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if world_size == 1:
        return order
    n = len(order)
    total = -(-n // world_size) * world_size
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world_size]


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """``train.batch_size`` is the global batch; each of N ranks takes ``batch_size / N``."""
    if batch_size % info.world_size:
        raise ValueError(f"train.batch_size = {batch_size} is the global batch and must be "
                         f"divisible by train.nproc_per_node = {info.world_size}")
    return batch_size // info.world_size


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of ``rank`` in ``epoch`` of a distributed run (per-rank sampling)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def prepare_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """Make the replicas identical (broadcast parameters and buffers from rank 0) and, on CUDA,
    turn every BatchNorm into SyncBatchNorm (CPU/gloo keeps per-rank batch norm: see the module
    docstring). Returns the model (converted in place where possible)."""
    if not info.enabled:
        return model
    if device.type == "cuda":
        model = _convert_sync_bn(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    return model


def _convert_sync_bn(model: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``: in place below the root (the detector keeps
    its attributes, and its optimizers their parameters: the new layers reuse the old layers'
    parameter and buffer objects, and the state_dict keys do not change)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _allreduce_mean(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` over the ranks, in place, with one all_reduce per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def _grad_sync_hook(world_size: int):
    def hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            _allreduce_mean(grads, world_size)
    return hook


def sync_gradients(optimizers: Iterable[torch.optim.Optimizer], info: DistInfo) -> list:
    """Average the gradients over the ranks before every ``step()`` of ``optimizers`` (a step
    pre-hook each). Every rank runs the same code path, so the set of parameters with a gradient
    is the same on all ranks. Returns the hook handles (``.remove()`` undoes it)."""
    if not info.enabled:
        return []
    return [opt.register_step_pre_hook(_grad_sync_hook(info.world_size)) for opt in optimizers]


def mean_losses(losses: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """The per-step losses averaged over the ranks (all ranks must pass the same keys)."""
    if not info.enabled:
        return dict(losses)
    keys = sorted(losses)
    t = torch.tensor([float(losses[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / info.world_size).tolist()))


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """``obj`` of rank ``src`` on every rank (small picklable objects only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
