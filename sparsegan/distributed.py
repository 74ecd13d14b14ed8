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
* trains every network of the detector wrapped in ``DistributedDataParallel``
  (:func:`wrap_networks`; ``device_ids=[LOCAL_RANK]`` on CUDA, none on CPU): DDP's autograd hooks
  all-reduce (average) the gradients bucket by bucket while the backward pass is still running,
  so all replicas take the same optimizer step and stay identical;
* logs, checkpoints and talks to MLflow on rank 0 only (:attr:`DistInfo.is_main`); losses are
  averaged over the ranks (:func:`mean_losses`) so that the logged epoch means are the global
  ones and a NaN on any rank stops every rank at the same step.

With one process none of this happens: no process group, no wrapper; :func:`unwrap` returns the
network itself, so the code path and the random numbers are those of a plain single-process run.

**What is DDP and what is not.** Each network that an optimizer trains (Sparse-GAN's ``encoder``,
``decoder``, ``discriminator`` and ``srn``; AnoGAN's ``generator`` and ``discriminator``;
f-AnoGAN's ``generator``, ``critic`` and ``encoder``) replaces its attribute on the detector by its
DDP wrapper, so ``self.encoder(x)`` in a ``train_step`` is DDP's forward. The detectors keep
calling ``backward`` and ``step`` themselves, several times per ``train_step``; what DDP needs
for that holds for every variant, and ``tests/test_ddp.py`` checks each point on 2 gloo ranks:

* *Several forwards before one backward* (D on real and on fake images, the critic on real, fake
  and interpolated images): every parameter's gradient is accumulated once per backward, so each
  DDP hook fires once and the reduction is the one of the summed loss.
* *A network used frozen* (D in the generator step, G and the critic in f-AnoGAN's encoder phase;
  ``requires_grad`` off, :func:`~sparsegan.models.gan_parts.frozen`) is called **bare**
  (:func:`unwrap`): it has nothing to reduce, so DDP is kept out of that forward altogether
  rather than relying on none of its hooks firing (which is what happens, with torch 2.14, if
  the wrapper is called). Samples that only feed the critic (f-AnoGAN's detached ``G(z)``) come
  from the bare generator too: no gradient, nothing for DDP to do.
* *Parameters used outside ``forward``*: the SRN's dictionary ``W_d`` (``srn.reconstruct``) and
  attributes such as ``srn.l1`` or ``generator.sample_z`` are reached through the bare module.
  DDP's hooks sit on the parameters' gradient accumulators, not on ``forward``, so ``W_d``'s
  gradient is reduced with the SRN's others. Every wrapped parameter gets a gradient in each
  backward of its network, so ``find_unused_parameters`` stays off (it would traverse the graph
  after every forward).
* *f-AnoGAN's gradient penalty*: ``torch.autograd.grad(create_graph=True)`` differentiates with
  respect to the interpolated *images*, so it runs no parameter's gradient accumulator and no DDP
  hook; the penalty is per sample, so each rank's input gradients are the single-process ones.
  The critic loss's ordinary ``backward`` then reaches every parameter once, through the
  double-backward graph too, and DDP reduces as usual (the pattern PyTorch's maintainers describe
  in pytorch/pytorch#63812). What DDP does not support is differentiating through its reduction
  or ``autograd.grad`` with respect to the parameters (pytorch/pytorch#63929), which no variant
  does. So no network needs a hand-written gradient all-reduce: on 2 gloo ranks the DDP critic's
  gradients equal per-rank backward passes averaged by hand (``tests/test_ddp.py``).

Buffers are not broadcast at every forward (``broadcast_buffers=False``): the only buffers of
the wrapped networks are batch-norm statistics (see below; f-AnoGAN's ``critic_steps`` belongs
to the detector, not to a network, and every rank counts it alike). The wrappers would prefix
every ``state_dict`` key with ``module.``; checkpoints and ``model.pt`` are written and read with
the bare networks in place (:func:`unwrapped`), so their keys are exactly those of a
single-process run (whether a checkpoint is resumed is still decided by the config hash, which
includes ``train.nproc_per_node``). ``train.compile``
compiles the bare networks before they are wrapped, so bare calls run compiled code as in one
process (PyTorch's DDP-aware graph splitting, which needs the wrapper compiled instead, is not
used).

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

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The network inside a ``DistributedDataParallel`` wrapper (``module`` itself otherwise):
    what the detectors call where DDP must stay out (frozen networks, methods other than
    ``forward``, attributes)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def wrap_networks(detector: nn.Module, device: torch.device, info: DistInfo) -> list[str]:
    """Replace every child network of ``detector`` that has trainable parameters by its
    ``DistributedDataParallel`` wrapper, in place (call after :func:`prepare_model`, and after
    ``torch.compile`` if any). Returns the wrapped names; a no-op with one process.

    No ``find_unused_parameters``: every wrapped parameter gets a gradient in each backward of its
    network. No ``broadcast_buffers``: the buffers are batch-norm statistics, equal on all ranks
    with SyncBatchNorm (CUDA) and per rank by design on CPU (see the module docstring)."""
    if not info.enabled:
        return []
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = []
    for name, module in list(detector.named_children()):
        if isinstance(module, DistributedDataParallel):
            continue
        if not any(p.requires_grad for p in module.parameters()):
            continue
        setattr(detector, name, DistributedDataParallel(module, device_ids=device_ids,
                                                        broadcast_buffers=False))
        wrapped.append(name)
    return wrapped


def unwrap_networks(detector: nn.Module) -> dict[str, nn.Module]:
    """Put the bare networks back in place of their DDP wrappers; returns the wrappers by name
    (to restore with ``setattr``)."""
    wrappers = {name: m for name, m in detector.named_children()
                if isinstance(m, DistributedDataParallel)}
    for name, wrapper in wrappers.items():
        setattr(detector, name, wrapper.module)
    return wrappers


@contextlib.contextmanager
def unwrapped(detector: nn.Module) -> Iterator[nn.Module]:
    """``detector`` with its bare networks for a while, so that ``state_dict`` and
    ``load_state_dict`` use the keys of a single-process run (no ``module.``); the DDP wrappers
    (same parameters, same reducers) are put back after."""
    wrappers = unwrap_networks(detector)
    try:
        yield detector
    finally:
        for name, wrapper in wrappers.items():
            setattr(detector, name, wrapper)


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
