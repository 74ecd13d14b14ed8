"""The model file: its format, trusted loading, the self-describing rebuild, the device.

``models/<model>/s<seed>/model.pt`` holds the weights with everything needed to rebuild the
detector without any params.yaml (:func:`model_file`): the model's name, seed and image size, the
params its training reads and the preprocessing its scans must get (:func:`stored_params`), and
what it was trained on. Every file from outside the process (model files, training checkpoints)
is read with ``torch.load(weights_only=True)`` (:func:`load_trusted`). Scoring, calibration, evaluation, the report, serving and ``sparsegan
predict`` load models through here and never import the trainer or the distribution code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .cli import StageError
from .models import Detector, build_detector
from .params import ParamError, Params, check_model, parse_params
from .spec import TRAIN_READS

class CheckpointError(StageError):
    """A checkpoint or model file cannot be used (unsafe pickle, corrupt, or not ours)."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device = cuda but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash at any point leaves either the old or the new
    file, never a partial one: write ``<path>.tmp``, flush it to disk, rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_trusted(path: Path, what: str, keys: tuple[str, ...],
                 map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so a crafted pickle
    cannot run code. Anything unsafe, unreadable or without ``keys`` raises CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load this {what}: it holds pickled objects other than tensors "
            f"and plain data{detail}, which could run code, so it was not made by this pipeline "
            f"(or by an incompatible version). Nothing was loaded; move it away (or delete it) "
            f"and re-run.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} (corrupt or truncated: "
                              f"{' '.join(str(exc).split())[:120]}); move it away (or delete "
                              f"it) and re-run.") from None
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise CheckpointError(f"{path}: not a {what} of this pipeline (expected the keys "
                              f"{', '.join(keys)}); move it away (or delete it) and re-run.")
    return state



MODEL_FORMAT = 5  # 5: its own preprocessing variant; 4: runtime settings apart (not stored);
                  # 3: one file per (model, seed)


class Trained(NamedTuple):
    """A trained model as read from its ``model.pt``, ready to score (eval mode)."""

    detector: Detector
    model: str  # one of sparsegan.params.MODELS
    seed: int
    image_size: int
    params: Params  # what it was trained with
    data: dict  # what it was trained on: source, folder, n_train, fingerprint


def model_file(model: str, seed: int, params: Params, image_size: int, config: str,
               weights: dict, data: dict) -> dict:
    """The content of ``model.pt``: enough to rebuild the detector without any params.yaml
    (model, seed, image size, :func:`stored_params`) and what it was trained on (``data``:
    source, folder, n_train, fingerprint); plain data and tensors only so that it loads with
    ``weights_only``."""
    return {"format": MODEL_FORMAT, "name": model, "seed": seed, "image_size": image_size,
            "config": config, "params": stored_params(model, params), "data": dict(data),
            "model": weights}


def stored_params(model: str, params: Params) -> dict:
    """What a model file keeps of ``params``: exactly the params its training reads
    (:data:`sparsegan.spec.TRAIN_READS`, sections or ``section.key``), and the preprocessing its
    scans must get. Nothing else, so that a param it never read (``train.lambda_sp`` for the
    Auto-Encoder) cannot change its bytes; the rest takes the defaults when it is rebuilt."""
    full = dataclasses.asdict(params)
    out: dict = {"preprocess": {"variant": {model: full["preprocess"]["variant"][model]}}}
    for read in TRAIN_READS[model]:
        section, _, key = read.partition(".")
        if key:
            out.setdefault(section, {})[key] = full[section][key]
        else:
            out[section] = full[section]
    return out


def load_trained(model_dir: Path, device: torch.device | None = None, *,
                 model: str | None = None) -> Trained:
    """The detector of ``model_dir/model.pt``, rebuilt from the params stored in it: the one
    loader of scoring, evaluation and ``sparsegan predict``. ``model``: the model the caller
    expects (another one is an error). Read with ``weights_only=True``; an unsafe, foreign,
    damaged or older-format file raises CheckpointError naming the file and what to run."""
    path = Path(model_dir) / "model.pt"
    what = f"train_{model}" if model else "train_<model>"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trained model; run `dvc repro {what}` first")
    state = load_trusted(path, "trained model", ("image_size", "model"))
    if state.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: a model file of an older layout (format "
                              f"{state.get('format', 1)}, this version reads {MODEL_FORMAT}); "
                              f"re-make it with `dvc repro {what}`")
    stored = state["name"]
    if model is not None and stored != model:
        raise CheckpointError(f"{path} holds model {stored!r}, not {model!r}")
    try:
        params = parse_params(state["params"])
        detector = build_detector(check_model(stored), params, int(state["image_size"]))
        detector.load_state_dict(state["model"])
    except (ParamError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit the architecture it describes "
                              f"({' '.join(str(exc).split())[:120]}); damaged, or made by "
                              f"another version: re-make it with `dvc repro {what}`") from None
    return Trained(detector.to(device or torch.device("cpu")).eval(), stored, int(state["seed"]),
                   int(state["image_size"]), params, dict(state.get("data") or {}))
