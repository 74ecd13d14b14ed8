"""Stage score@<model>-<seed>: every anomaly score a trained model gives (the rows' scores,
:data:`sparsegan.spec.MODEL_SCORES`), of the validation and test scans, in one pass; the test
anomaly maps; how well each map localises the validation lesions (no metric of the test split).

Scoring only: training never imports this module (tests/test_stage_deps.py), so a change here
re-scores without re-training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .anomaly import (anogan_search, anomaly_activation_map, difference_map, image_anomaly_score,
                      izif_score, latent_anomaly_score, residual_activation_map)
from .data.dataset import iterate_batches, load_split
from .metrics import MAP_NAMES, pixel_auroc
from .checkpoint import load_trained, resolve_device
from .layout import SETTINGS
from .models import Detector
from .models.anogan import AnoGAN
from .models.fanogan import FAnoGAN
from .models.gan_parts import frozen
from .models.sparse_gan import ReconstructionDetector
from .params import ScoreParams
from .spec import MODEL_SCORES, MODEL_SPECS, SPECS, SpecError


@dataclass
class ScoreOutput:
    """``score``: (B,) anomaly score, higher = more anomalous.
    ``maps``: name -> (B, 1, S, S) anomaly maps in the input's resolution; every score gives
    ``"difference"`` (|I_in - I_re|); the latent score also ``"aam"`` (eq. 8) and
    ``"aam_residual"`` (the same weights on |H_in - H_re|).
    ``reconstruction``: (B, 1, S, S) in [-1, 1]."""

    score: torch.Tensor
    reconstruction: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


def reconstruction_scores(detector: ReconstructionDetector, x: torch.Tensor,
                          knobs: ScoreParams) -> dict[str, ScoreOutput]:
    """The image-level score (MSE of I_in and I_re) and the latent score (eq. 4) of a
    reconstruction model, with their maps."""
    latent = detector.encoder(x)  # H_in
    rec = detector.decoder(latent)  # I_re
    latent_re = detector.encoder(rec)  # H_re = E(I_re), E = G_en
    diff = difference_map(x, rec)
    size = x.shape[-1]
    return {"image": ScoreOutput(image_anomaly_score(x, rec), rec, {"difference": diff}),
            "latent": ScoreOutput(latent_anomaly_score(latent, latent_re), rec,  # eq. 4
                                  {"difference": diff,
                                   "aam": anomaly_activation_map(latent, latent_re, size),
                                   "aam_residual": residual_activation_map(latent, latent_re,
                                                                           size)})}


def anogan_scores(detector: AnoGAN, x: torch.Tensor, knobs: ScoreParams) -> dict[str, ScoreOutput]:
    """AnoGAN's score: a gradient search over z per image (``score.anogan``)."""
    k = knobs.anogan
    _, loss, generated = anogan_search(detector.generator, detector.discriminator, x,
                                       detector.p.latent_dim, k.search_steps, k.search_lr,
                                       k.search_init, k.weight)
    return {"search": ScoreOutput(loss, generated, {"difference": difference_map(x, generated)})}


def fanogan_scores(detector: FAnoGAN, x: torch.Tensor, knobs: ScoreParams) -> dict[str, ScoreOutput]:
    """f-AnoGAN's izif score (image and critic-feature residuals of G(E(x)))."""
    with frozen(detector.generator, detector.critic, detector.encoder):
        image_mse, feature_mse, rec = detector.izif(x)
    return {"izif": ScoreOutput(izif_score(image_mse, feature_mse, detector.p.kappa), rec,
                                {"difference": difference_map(x, rec)})}


# The scorers a ModelSpec names (sparsegan/spec.py): detector, batch, knobs -> its scores.
SCORERS: dict[str, Callable[..., dict[str, ScoreOutput]]] = {
    "reconstruction": reconstruction_scores, "anogan": anogan_scores, "fanogan": fanogan_scores}
_missing = sorted({s.scorer for s in MODEL_SPECS} - set(SCORERS))
if _missing:
    raise SpecError(f"sparsegan/spec.py names the scorers {_missing}, which "
                    f"sparsegan/scoring.py's SCORERS lacks; add a function for each")


@torch.no_grad()
def score_batch(detector: Detector, x: torch.Tensor,
                knobs: ScoreParams = ScoreParams()) -> dict[str, ScoreOutput]:
    """Every score of ``detector`` for a batch ``x`` (B, 1, S, S) in [-1, 1], by score name (its
    spec's ``scores``, computed by its spec's scorer), the detector in eval mode."""
    spec = SPECS.get(detector.name)
    if spec is None:
        raise TypeError(f"{type(detector).__name__} has no model name of sparsegan/spec.py; "
                        f"build it with sparsegan.models.build_detector")
    out = SCORERS[spec.scorer](detector, x, knobs)
    if tuple(out) != spec.scores:
        raise SpecError(f"scorer {spec.scorer!r} gave the scores {tuple(out)}, but "
                        f"sparsegan/spec.py says {spec.name} gives {spec.scores}")
    return out


def score_images(detector: Detector, images: np.ndarray, batch_size: int, device: torch.device,
                 keep_maps: bool, knobs: ScoreParams = ScoreParams()
                 ) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per score name: scores (N,) and, if ``keep_maps``, float16 maps (N, 1, S, S) by name plus
    the reconstruction as uint8 ("reconstruction")."""
    scores: dict[str, list] = {}
    maps: dict[str, dict[str, list]] = {}
    for x in iterate_batches(images, batch_size, shuffle=False):
        for name, out in score_batch(detector, x.to(device), knobs).items():
            scores.setdefault(name, []).append(out.score.float().cpu().numpy())
            if keep_maps:
                kept = maps.setdefault(name, {})
                for m, value in out.maps.items():
                    kept.setdefault(m, []).append(value.float().cpu().numpy().astype(np.float16))
                rec = ((out.reconstruction.float().cpu().numpy() + 1) * 127.5).round().clip(0, 255)
                kept.setdefault("reconstruction", []).append(rec.astype(np.uint8))
    return {name: (np.concatenate(s), {k: np.concatenate(v) for k, v in maps.get(name, {}).items()})
            for name, s in scores.items()}


def score_model(model: str, seed: int, knobs: ScoreParams, batch_size: int, device_name: str,
                processed_dir: Path, model_dir: Path, out_dir: Path,
                run_file: Path | None = None) -> None:
    """``out_dir/settings.json``: the model, seed and score knobs (what a screening model built
    from these scores must score with). For each score ``s`` of ``model``:
    ``out_dir/<s>/{val,test}.csv`` (index + score),
    ``test_maps.npz`` and, when the validation scans have lesion masks,
    ``val_localisation.json``: the pixel AUROC of each anomaly map on the diseased validation
    scans (calibration picks the map shown from it). The images/s of each split go to
    ``run_file`` (the run, not its output). ``seed`` seeds torch's RNG, so that a score that
    drew random numbers would be reproducible per trained model."""
    device = resolve_device(device_name)
    torch.manual_seed(seed)
    detector = load_trained(model_dir, device, model=model).detector
    timing: dict[str, float] = {}
    results = {}
    for split in ("val", "test"):
        images, index, _ = load_split(processed_dir, split)
        masks_path = processed_dir / f"{split}_masks.npy"
        localise = split == "val" and masks_path.exists()
        tic = time.perf_counter()
        results[split] = (index, score_images(detector, images, batch_size, device,
                                              keep_maps=split == "test" or localise, knobs=knobs))
        timing[f"{split}_images_per_s"] = len(images) / (time.perf_counter() - tic)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS).write_text(json.dumps(
        {"model": model, "seed": seed, "score": dataclasses.asdict(knobs)}, indent=1))
    for name in MODEL_SCORES[model]:
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, (index, by_score) in results.items():
            scores, maps = by_score[name]
            index.assign(score=scores).to_csv(folder / f"{split}.csv", index=False)
            if split == "test":
                save_npz(folder / "test_maps.npz", maps)
            elif maps:
                masks = np.load(processed_dir / "val_masks.npy", mmap_mode="r")
                sick = ((index["label"].to_numpy() == 1)
                        & np.asarray(masks).reshape(len(masks), -1).any(axis=1))
                result = {m: pixel_auroc(maps[m][sick].astype(np.float32), masks[sick])
                          for m in MAP_NAMES if m in maps and sick.any()}
                (folder / "val_localisation.json").write_text(json.dumps(result, indent=1))
    if run_file is not None:
        run_file.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(timing, indent=1))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``, but the same arrays give the same bytes: numpy stamps each
    member with the current time, which would change the score stage's output hash on every
    run (and re-run everything after it)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
