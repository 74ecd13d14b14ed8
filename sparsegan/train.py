"""Training of any model on the normal training scans, with per-epoch checkpoints and MLflow.

The loop is the same for every model: epochs follow ``detector.phases()``, each epoch is one
pass over the shuffled normal training scans in batches of ``train.batch_size``, and
``detector.train_step`` does the model's updates. The finished model goes to
``models/<model>/s<seed>/model.pt``, a file that describes itself (:func:`model_file`).

Reliability (tests/reliability proves each point):

* **Checkpoints**: ``checkpoints/<model>/s<seed>/checkpoint.pt`` holds the models (incl. buffers such as
  f-AnoGAN's critic step counter), every optimizer (and scheduler, if a model has any), the RNG
  states (torch CPU/CUDA, the shuffle generator, numpy, random), the epoch, the loss history, the
  config hash and the MLflow run id. It is written before the first epoch and after every epoch,
  atomically (write ``.tmp``, fsync, rename), so a run killed at any point, SIGKILL included,
  resumes after the last finished epoch when re-run; on CPU the result is bit for bit that of an
  uninterrupted run. ``checkpoints/`` is outside DVC's outputs (DVC deletes ``models/<model>/s<seed>``
  before re-running a stage), so ``dvc repro`` resumes too. It is deleted once ``model.pt`` is saved.
* **Other params or data**: a checkpoint whose config hash (model, seed, image size and the
  params of :data:`sparsegan.spec.TRAIN_READS`) or training-data fingerprint
  (:func:`data_fingerprint`) differs from the current ones is never resumed and never deleted: it is renamed to
  ``checkpoint.config-<hash>.pt`` (or ``checkpoint.data-<hash>.pt``) with a message on stderr,
  and training starts afresh.
* **Divergence**: a NaN/Inf loss raises :class:`FloatingPointError` naming the model, the
  optimizer step, epoch and batch, before that step is taken
  (:meth:`sparsegan.models.base.Detector.update`) and before anything is saved: the last good
  checkpoint stays as it was.
* **Files from outside**: checkpoints and models are read with ``torch.load(weights_only=True)``;
  a file whose pickle holds anything but tensors and plain data (which could run code) or that
  is not a readable checkpoint raises :class:`CheckpointError` naming the file, and is not used.
* **MLflow**: the store is checked (:func:`~sparsegan.tracking.check_tracking`) before any work.
  A resumed run logs into the MLflow run of the checkpoint; metrics are logged after the
  checkpoint is saved and missing epochs are filled in from the checkpoint's history on resume,
  so every epoch is logged exactly once.

Speed (``scripts/bench.py`` measures each point; ``make bench``):

* **Data**: batches come from the uint8 memmap by one sorted gather into one buffer, are copied
  to the device as uint8 (page-locked and asynchronous on CUDA, with a prefetch thread there:
  :func:`data_prefetch`) and converted to float on the device. The epoch's time spent waiting
  for batches is logged as ``data_wait_share``.
* **Layout and precision**: the networks and batches are channels_last on CPU too (oneDNN's
  preferred layout), bf16 autocast and ``cudnn.benchmark`` on CUDA;
  ``runtime.compile`` compiles the networks (:func:`compile_networks`).
* **Several GPUs**: under torchrun (``runtime.nproc_per_node`` > 1, see
  :mod:`sparsegan.distributed`) each rank trains on its shard of every global batch, the
  gradients averaged over the ranks in every optimizer step (the detectors' update path), and
  rank 0 alone logs, checkpoints and writes the model; a resumed run restarts all ranks from
  rank 0's checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .checkpoint import CheckpointError, load_trusted, model_file, resolve_device, save_atomic
from .data.dataset import iterate_batches, load_split
from .models import Detector, build_detector
from .models.base import Diverged
from .params import Params, check_model
from .spec import TRAIN_READS
from .tracking import check_tracking, flatten, log_training_data, start_run

# A history row's keys that describe the run (this machine, this time), not the model.
RUN_KEYS = ("seconds", "images_per_s", "data_wait_share")
CHECKPOINT_KEYS = ("config", "epoch", "history", "mlflow_run_id", "model", "optimizers", "rng")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; CPU runs in fp32, unchanged."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_detector(model: str, seed: int, params: Params, image_size: int, device: torch.device,
                   dist: distributed.DistInfo = distributed.DistInfo(), *,
                   channels_last: bool = True) -> Detector:
    """A fresh detector set up as training runs it: initialised from ``seed``, on ``device``,
    NHWC (cuDNN's and oneDNN's preferred layout, on CPU too), ``cudnn.benchmark`` on CUDA, the
    replicas made identical (SyncBatchNorm on CUDA, weights broadcast from rank 0) and its
    updates averaged over the ranks under torchrun, compiled when ``runtime.compile``. The one
    set-up of :func:`train_model`, ``scripts/bench.py`` and ``scripts/gpu_check.py``
    (``channels_last=False``: the benchmark's NCHW ablation)."""
    torch.manual_seed(seed)
    detector = build_detector(model, params, image_size).to(device)
    if channels_last:
        detector = detector.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    detector = distributed.prepare_model(detector, device, dist)
    if params.runtime.compile:
        compile_networks(detector)
    if dist.enabled:  # every optimizer step then averages the gradients over the ranks
        detector.average_gradients_with(functools.partial(distributed.average_gradients,
                                                          info=dist))
    return detector.train()


def train_step(detector: Detector, x: torch.Tensor, phase: str, device: torch.device,
               channels_last: bool = True) -> dict[str, float]:
    """One step on batch ``x`` as the training loop takes it: NHWC (unless ``channels_last`` is
    off, as in :func:`setup_detector`), bf16 autocast on CUDA; returns the step's losses."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        return detector.train_step(x, phase)


def trained_params(model: str, params: Params) -> dict[str, Any]:
    """The flattened params (``"train.lr" -> 0.001``) that ``model``'s training reads
    (:data:`~sparsegan.spec.TRAIN_READS`): what its checkpoints are keyed by and its MLflow
    run logs."""
    reads = TRAIN_READS[model]
    return {k: v for k, v in flatten(params).items()
            if any(k == r or k.startswith(r + ".") for r in reads)}


def config_hash(model: str, seed: int, params: Params, image_size: int) -> str:
    """Identifies what a checkpoint was trained with (the params ``model``'s training reads,
    :data:`~sparsegan.spec.TRAIN_READS`), so that a resume never mixes settings."""
    payload = json.dumps([model, seed, image_size, trained_params(model, params)],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state(),
             "python": random.getstate(),
             "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                             "pos": int(np_state["state"]["pos"])}}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np_state = dict(state["numpy"])
        np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                             "pos": np_state["state"]["pos"]}
        np.random.set_state(np_state)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _state(detector: Detector, epoch: int, history: list, config: str, data: str,
           run_id: str | None, generator: torch.Generator, device: torch.device) -> dict:
    return {
        "config": config,
        "data": data,
        "epoch": epoch,
        "history": history,
        "mlflow_run_id": run_id,
        "model": detector.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in detector.optimizers().items()},
        "schedulers": {k: s.state_dict() for k, s in detector.schedulers().items()},
        "rng": _rng_state(generator, device),
    }


def _move_aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to ``<stem>.<tag>.pt`` (``-1``, ``-2``... if taken); never deletes."""
    for k in range(1000):
        dest = path.with_name(f"{path.stem}.{tag}{f'-{k}' if k else ''}{path.suffix}")
        if not dest.exists():
            os.replace(path, dest)
            return dest
    raise CheckpointError(f"{path}: too many set-aside checkpoints next to it; clean up "
                          f"{path.parent}")


def data_fingerprint(images: np.ndarray, processed_dir: Path) -> str:
    """Identifies the training data of a checkpoint: ``train.csv``, the array's shape and 64
    evenly spaced images (a few MB at most, so it is cheap on 50,000 scans)."""
    h = hashlib.sha256((Path(processed_dir) / "train.csv").read_bytes())
    h.update(repr((images.shape, str(images.dtype))).encode())
    rows = np.unique(np.linspace(0, len(images) - 1, num=min(len(images), 64)).astype(np.int64))
    h.update(np.ascontiguousarray(images[rows]).tobytes())
    return h.hexdigest()[:16]


def _resume_state(checkpoint: Path, config: str, data: str, tag: str) -> dict | None:
    """The checkpoint to resume from, or None (none yet, or set aside: made with other params
    or other training data). Read on the CPU (RNG states must stay CPU tensors)."""
    if not checkpoint.exists():
        return None
    state = load_trusted(checkpoint, "training checkpoint", CHECKPOINT_KEYS)
    if state["config"] != config or state.get("data") != data:
        what, tag = (("other params", f"config-{state['config']}") if state["config"] != config
                     else ("other training data", f"data-{state.get('data')}"))
        dest = _move_aside(checkpoint, tag)
        print(f"[train {tag}] {checkpoint} was made with {what}: not resuming it; moved it "
              f"to {dest} (nothing deleted) and training from scratch", file=sys.stderr)
        return None
    return state


def _row_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items()
            if k.startswith(("loss_", "lr_")) or k in ("images_per_s", "data_wait_share")}


def data_prefetch(device: torch.device) -> int:
    """Batches gathered ahead by a background thread: 2 on CUDA (the gather and the page-locked
    copy overlap the GPU's work), 0 on CPU, where the thread would only take cycles from the
    step's own threads (``scripts/bench.py`` measures the wait both ways)."""
    return 2 if device.type == "cuda" else 0


def compile_networks(detector: Detector) -> None:
    """``runtime.compile``: ``torch.compile`` every network of ``detector`` in place
    (``nn.Module.compile``: the state_dict keys stay as they are), except f-AnoGAN's critic,
    whose gradient penalty needs a double backward, which compiled graphs do not support.
    """
    for name, module in detector.named_children():
        if name == "critic":
            continue
        module.compile()


def _log_missing_epochs(run_id: str, history: list[dict]) -> None:
    """Log the epochs of ``history`` that the MLflow run lacks (a run killed between saving its
    checkpoint and logging that epoch), so that every epoch is logged exactly once."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client, logged = MlflowClient(), {}
    for row in history:
        metrics = _row_metrics(row)
        key = sorted(metrics)[0]
        if key not in logged:
            logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if row["epoch"] not in logged[key]:
            mlflow.log_metrics(metrics, step=row["epoch"])


def train_model(model: str, seed: int, params: Params, processed_dir: Path, model_dir: Path,
                checkpoint_dir: Path, log_mlflow: bool = True,
                run_file: Path | None = None) -> list[dict]:
    """Train ``model`` from ``seed`` on ``processed_dir/train.npy`` and write
    ``model_dir/model.pt`` and ``history.json`` (the per-epoch phase, losses and learning
    rates), resuming from ``checkpoint_dir/checkpoint.pt`` when it exists. What the run itself
    was (the per-epoch seconds, images/s and data-wait share, the MLflow run) goes to
    ``run_file``, never into ``model_dir``, whose hash must change only with the model. Returns
    the per-epoch rows (timings included)."""
    check_model(model)
    tag = f"{model} s{seed}"  # in messages
    r = params.runtime
    dist, device = distributed.setup(resolve_device(r.device))  # a no-op outside torchrun
    if r.nproc_per_node > 1 and not dist.enabled:
        print(f"[train {tag}] runtime.nproc_per_node = {r.nproc_per_node}, but this process was "
              f"not started by torchrun: training in this one process (stages/train.py launches "
              f"torchrun itself)", file=sys.stderr)
    main = dist.is_main  # rank 0 logs, checkpoints and writes the model
    log_mlflow = log_mlflow and main
    if log_mlflow:
        check_tracking()  # an unreachable store is reported now, not after hours of training
    if r.num_threads:
        torch.set_num_threads(r.num_threads)
    batch_size = distributed.per_rank_batch(params.train.batch_size, dist)
    images, _, _ = load_split(processed_dir, "train")
    image_size = images.shape[-1]
    detector = setup_detector(model, seed, params, image_size, device, dist)
    if dist.enabled and main:
        print(f"[train {tag}] data parallel over {dist.world_size} processes (gradients "
              f"averaged in every optimizer step)", file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    config = config_hash(model, seed, params, image_size)
    data = data_fingerprint(images, processed_dir)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / "checkpoint.pt"
    start_epoch, history, run_id = 0, [], None
    # rank 0 decides (it may set a stale checkpoint aside); the others then read the same file
    state = _resume_state(checkpoint, config, data, tag) if main else None
    if distributed.broadcast_object(state is not None, dist) and not main:
        state = load_trusted(checkpoint, "training checkpoint", CHECKPOINT_KEYS)
    if state is not None:
        detector.load_state_dict(state["model"])
        for name, opt in detector.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in detector.schedulers().items():
            sched.load_state_dict(state["schedulers"][name])
        _set_rng_state(state["rng"], generator, device)
        start_epoch, history, run_id = state["epoch"], state["history"], state["mlflow_run_id"]
        if main:
            print(f"[train {tag}] resuming after epoch {start_epoch} from {checkpoint}")
        del state

    run = start_run(model, seed, run_id) if log_mlflow else contextlib.nullcontext()
    with run as active:
        if log_mlflow:
            import mlflow
            if active.info.run_id != run_id:  # a new run (or the old one is not in this store)
                run_id = active.info.run_id
                mlflow.log_params(trained_params(model, params))
                mlflow.log_params({"model": model, "seed": seed, "device": str(device),
                                   "n_train": len(images)})
                log_training_data(images, processed_dir / "train.npy", params.data.source)
            _log_missing_epochs(run_id, history)
        phases = detector.phases()
        if start_epoch == 0 and main:  # the starting point, with the run id: a kill in epoch 1 resumes too
            save_atomic(_state(detector, 0, history, config, data, run_id, generator, device),
                         checkpoint)
        for epoch in range(start_epoch, len(phases)):
            detector.train()
            if dist.enabled:  # per-rank sampling (the GAN baselines' z), reproducible on resume
                torch.manual_seed(distributed.epoch_seed(seed, epoch, dist.rank))
            sums: dict[str, float] = {}
            n_batches, waited, tic = 0, 0.0, time.perf_counter()
            batches = iterate_batches(images, batch_size, shuffle=True, generator=generator,
                                      device=device, pin_memory=device.type == "cuda",
                                      prefetch=data_prefetch(device), rank=dist.rank,
                                      world_size=dist.world_size)
            while True:
                wait = time.perf_counter()
                x = next(batches, None)  # uint8 from the memmap, float on the device
                waited += time.perf_counter() - wait
                if x is None:
                    break
                try:
                    losses = train_step(detector, x, phases[epoch], device)
                except Diverged as exc:  # before that optimizer step; nothing saved since the last epoch
                    raise FloatingPointError(
                        f"[train {tag}] training diverged: {exc} at epoch {epoch + 1}, step "
                        f"{n_batches + 1}; the last good checkpoint ({checkpoint}, after epoch "
                        f"{epoch}) is kept. Lower train.lr or the lambdas and re-run (a "
                        f"checkpoint of other params is set aside, not resumed).") from None
                losses = distributed.mean_losses(losses, dist)  # the same on every rank
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_batches += 1
            seconds = time.perf_counter() - tic
            means = {f"loss_{k}": v / max(n_batches, 1) for k, v in sums.items()}
            lrs = {f"lr_{k}": opt.param_groups[0]["lr"] for k, opt in detector.optimizers().items()}
            for sched in detector.schedulers().values():  # per epoch (pix2pix's schedule)
                sched.step()
            row = {"epoch": epoch + 1, "phase": phases[epoch], **means, **lrs,
                   "seconds": seconds, "images_per_s": len(images) / seconds,
                   "data_wait_share": waited / seconds if seconds > 0 else 0.0}
            history.append(row)
            if not main:
                continue
            print(f"[train {tag}] epoch {epoch + 1}/{len(phases)} ({phases[epoch]}) "
                  + " ".join(f"{k}={v:.4f}" for k, v in means.items())
                  + f" {seconds:.1f}s (data wait {row['data_wait_share']:.1%})")
            # checkpoint first, then MLflow: a kill in between is caught up on resume
            save_atomic(_state(detector, epoch + 1, history, config, data, run_id, generator,
                                device), checkpoint)
            if log_mlflow:
                mlflow.log_metrics(_row_metrics(row), step=epoch + 1)

    if not main:
        distributed.teardown()
        return history
    model_dir.mkdir(parents=True, exist_ok=True)
    trained_on = {"source": params.data.source, "folder": params.data.folder,
                  "n_train": len(images), "fingerprint": data}
    save_atomic(model_file(model, seed, params, image_size, config, detector.state_dict(),
                            trained_on), model_dir / "model.pt")
    (model_dir / "history.json").write_text(json.dumps(
        [{k: v for k, v in row.items() if k not in RUN_KEYS} for row in history], indent=1))
    if run_file is not None:
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"mlflow_run_id": run_id, "epochs": [
            {"epoch": row["epoch"], **{k: row[k] for k in RUN_KEYS if k in row}}
            for row in history]}, indent=1))
    checkpoint.unlink(missing_ok=True)
    distributed.teardown()
    return history
