"""Data-parallel training on several GPUs (or CPU processes) under ``torchrun``.

``runtime.nproc_per_node: N`` (N > 1) makes ``stages/train.py`` re-launch itself through
``python -m torch.distributed.run --standalone --nproc_per_node N`` (:func:`relaunch`), so that
``dvc repro`` trains on N processes; running the stage under ``torchrun`` yourself works too.
Each process then:

* joins the process group (:func:`setup`): NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
  gloo on CPU;
* reads its own shard of each epoch's shuffled order, as ``DistributedSampler`` does
  (:func:`sparsegan.data.dataset.shard`, used by its ``iterate_batches``): every rank draws the
  same permutation from the same seeded generator, pads it to a multiple of N by repeating its
  start, and takes every N-th index from its rank on. ``train.batch_size`` stays the **global**
  batch (the paper's 32 whatever N is), each rank takes ``batch_size / N`` of it, so the union of
  the ranks' step-k batches is exactly the single-process step-k batch;
* averages the gradients over the ranks in the one update path of every detector
  (:meth:`sparsegan.models.base.Detector.update`: zero_grad, backward,
  :func:`average_gradients`, NaN guard, step), so all replicas take the same optimizer step and
  stay identical;
* logs, checkpoints and talks to MLflow on rank 0 only (:attr:`DistInfo.is_main`); losses are
  averaged over the ranks (:func:`mean_losses`) so that the logged epoch means are the global
  ones; the loss of every step is averaged with the gradients, so a NaN on any rank stops every
  rank at the same step, before that step.

With one process none of this happens: no process group, no all-reduce, so the code path and the
random numbers are those of a plain single-process run.

**Why not DistributedDataParallel.** The detectors take several optimizer steps per batch (D, then
G; f-AnoGAN's critic with a gradient penalty, then G every n_critic steps), run networks frozen
in another network's step, and use parameters outside ``forward`` (the SRN's dictionary). DDP
wrappers around each network made every model file aware of them (the bare network for frozen
calls and attributes, the wrapper for the trained forward). Averaging the gradients explicitly,
once per optimizer step, reduces exactly what that step uses, whatever the model does in between,
and leaves the networks bare: the state_dict keys are those of one process, nothing to unwrap.
What it gives up is DDP's overlap of the all-reduce with the backward pass: one flat all-reduce
per step instead, which matters only across many GPUs. ``tests/test_ddp.py`` checks on 2 gloo
ranks that every model trains like gradients averaged by hand and that 2 processes equal one.

**Batch norm.** On CUDA every ``BatchNorm`` becomes ``SyncBatchNorm`` (:func:`prepare_model`), so
the statistics are those of the global batch, as on one GPU, and the running statistics stay
equal on all ranks. ``SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo) each rank normalises
with its own ``batch_size / N`` images and keeps its own running statistics; rank 0's are the
ones saved. Training is then not identical to one process (smaller BN batches); ``model.norm:
none`` removes batch norm from the generator (``tests/test_ddp.py`` uses it to check that N CPU
processes give the single-process parameters).

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
                               f"runtime.nproc_per_node")
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


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """``train.batch_size`` is the global batch; each of N ranks takes ``batch_size / N``."""
    if batch_size % info.world_size:
        raise ValueError(f"train.batch_size = {batch_size} is the global batch and must be "
                         f"divisible by runtime.nproc_per_node = {info.world_size}")
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


def average_gradients(params: Iterable[nn.Parameter], loss: torch.Tensor,
                      info: DistInfo) -> float:
    """Average the gradients of ``params`` (those that have one) and ``loss`` over the ranks,
    in place, with one all-reduce of one flat buffer; returns the averaged loss. With one
    process: ``float(loss)``, nothing else. The update path of every detector
    (:meth:`sparsegan.models.base.Detector.update`) calls it between backward and step, so all
    replicas take the same step; every rank runs the same code, so the same parameters have
    gradients on every rank."""
    if not info.enabled:
        return float(loss)
    grads = [p.grad for p in params if p.grad is not None]
    dtype = grads[0].dtype if grads else torch.float32
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(info.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


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
