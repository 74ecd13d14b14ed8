"""Training of any variant on the normal training scans, with per-epoch checkpoints and MLflow.

The loop is the same for every variant: epochs follow ``detector.phases()``, each epoch is one
pass over the shuffled normal training scans in batches of ``train.batch_size``, and
``detector.train_step`` does the variant's updates. Checkpoints are written atomically after every
epoch to ``checkpoints/<variant>/`` (outside DVC's outputs, which DVC deletes before a re-run), so
an interrupted run resumes where it stopped; the finished model goes to ``models/<variant>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .data.dataset import iterate_batches, load_split
from .models import Detector, build_detector
from .params import Params
from .tracking import flatten, start_run


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = cuda but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; CPU runs in fp32, unchanged."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def config_hash(variant: str, params: Params, image_size: int) -> str:
    """Identifies what a checkpoint was trained with, so that a resume never mixes settings."""
    relevant = {k: v for k, v in flatten(params).items()
                if k.split(".")[0] in ("seed", "model", "srn", "train", "anogan", "fanogan")}
    payload = json.dumps([variant, image_size, relevant], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state(detector: Detector, epoch: int, history: list, config: str, run_id: str | None,
           generator: torch.Generator) -> dict:
    return {
        "config": config,
        "epoch": epoch,
        "history": history,
        "mlflow_run_id": run_id,
        "model": detector.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in detector.optimizers().items()},
        "rng": {"torch": torch.get_rng_state(), "shuffle": generator.get_state()},
    }


def train_variant(variant: str, params: Params, processed_dir: Path, model_dir: Path,
                  checkpoint_dir: Path, log_mlflow: bool = True) -> list[dict]:
    """Train ``variant`` on ``processed_dir/train.npy`` and write ``model_dir/model.pt``.
    Returns the per-epoch mean losses."""
    t = params.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    images, _, _ = load_split(processed_dir, "train")
    image_size = images.shape[-1]
    torch.manual_seed(params.seed)
    detector = build_detector(variant, params, image_size).to(device)
    if device.type == "cuda":
        detector = detector.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(params.seed)
    config = config_hash(variant, params, image_size)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / "checkpoint.pt"
    start_epoch, history, run_id = 0, [], None
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["config"] == config:
            detector.load_state_dict(state["model"])
            for name, opt in detector.optimizers().items():
                opt.load_state_dict(state["optimizers"][name])
            torch.set_rng_state(state["rng"]["torch"])
            generator.set_state(state["rng"]["shuffle"])
            start_epoch, history, run_id = state["epoch"], state["history"], state["mlflow_run_id"]
            print(f"[train {variant}] resuming after epoch {start_epoch} from {checkpoint}")

    run = start_run(variant, run_id) if log_mlflow else contextlib.nullcontext()
    with run as active:
        if log_mlflow:
            import mlflow
            run_id = active.info.run_id
            if start_epoch == 0:
                mlflow.log_params({k: v for k, v in flatten(params).items()
                                   if not k.startswith("variants.")})
                mlflow.log_params({"variant": variant, "device": str(device),
                                   "n_train": len(images)})
        phases = detector.phases()
        for epoch in range(start_epoch, len(phases)):
            detector.train()
            sums: dict[str, float] = {}
            n_batches, tic = 0, time.perf_counter()
            for x in iterate_batches(images, t.batch_size, shuffle=True, generator=generator):
                x = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device):
                    losses = detector.train_step(x, phases[epoch])
                bad = [k for k, v in losses.items() if not np.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"[train {variant}] loss {bad[0]} is {losses[bad[0]]} at epoch {epoch + 1}, "
                        f"step {n_batches + 1}; the last good checkpoint is {checkpoint}. Lower "
                        f"train.lr or the lambdas and re-run.")
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_batches += 1
            seconds = time.perf_counter() - tic
            means = {f"loss_{k}": v / max(n_batches, 1) for k, v in sums.items()}
            row = {"epoch": epoch + 1, "phase": phases[epoch], **means,
                   "images_per_s": len(images) / seconds}
            history.append(row)
            print(f"[train {variant}] epoch {epoch + 1}/{len(phases)} ({phases[epoch]}) "
                  + " ".join(f"{k}={v:.4f}" for k, v in means.items()) + f" {seconds:.1f}s")
            if log_mlflow:
                mlflow.log_metrics({**means, "images_per_s": row["images_per_s"]}, step=epoch + 1)
            _save_atomic(_state(detector, epoch + 1, history, config, run_id, generator), checkpoint)

    model_dir.mkdir(parents=True, exist_ok=True)
    _save_atomic({"variant": variant, "image_size": image_size, "config": config,
                  "model": detector.state_dict()}, model_dir / "model.pt")
    (model_dir / "history.json").write_text(json.dumps(history, indent=1))
    (model_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}))
    checkpoint.unlink(missing_ok=True)
    return history


def load_detector(variant: str, params: Params, model_dir: Path,
                  device: torch.device | None = None) -> Detector:
    """The trained detector of ``model_dir/model.pt``, in eval mode."""
    path = model_dir / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run `dvc repro train@{variant}` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    detector = build_detector(variant, params, state["image_size"])
    detector.load_state_dict(state["model"])
    return detector.to(device or torch.device("cpu")).eval()
