"""Stage score@<variant>: anomaly scores of the validation and test scans, the test anomaly maps,
and how well each map localises the validation lesions (no metric of the test split here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .data.dataset import iterate_batches, load_split
from .metrics import MAP_NAMES, pixel_auroc
from .params import Params
from .train import load_trained, resolve_device


def score_images(detector, images: np.ndarray, batch_size: int, device: torch.device,
                 keep_maps: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores (N,) and, if ``keep_maps``, float16 maps (N, 1, S, S) by name plus the
    reconstruction as uint8 ("reconstruction")."""
    scores, maps = [], {}
    for x in iterate_batches(images, batch_size, shuffle=False):
        out = detector.score(x.to(device))
        scores.append(out.score.float().cpu().numpy())
        if keep_maps:
            for name, m in out.maps.items():
                maps.setdefault(name, []).append(m.float().cpu().numpy().astype(np.float16))
            rec = ((out.reconstruction.float().cpu().numpy() + 1) * 127.5).round().clip(0, 255)
            maps.setdefault("reconstruction", []).append(rec.astype(np.uint8))
    return np.concatenate(scores), {k: np.concatenate(v) for k, v in maps.items()}


def score_variant(variant: str, params: Params, processed_dir: Path, model_dir: Path,
                  out_dir: Path) -> None:
    """Write ``out_dir/{val,test}.csv`` (index + score), ``test_maps.npz``, ``timing.json`` and,
    when the validation scans have lesion masks, ``val_localisation.json``: the pixel AUROC of
    each anomaly map on the diseased validation scans (calibration picks the map shown from it)."""
    device = resolve_device(params.train.device)
    torch.manual_seed(params.seed)  # AnoGAN's search draws its start from torch's RNG
    detector = load_trained(model_dir, device, variant=variant, scoring=params).detector
    out_dir.mkdir(parents=True, exist_ok=True)
    timing = {}
    for split in ("val", "test"):
        images, index, _ = load_split(processed_dir, split)
        tic = time.perf_counter()
        masks_path = processed_dir / f"{split}_masks.npy"
        localise = split == "val" and masks_path.exists()
        scores, maps = score_images(detector, images, params.train.batch_size, device,
                                    keep_maps=split == "test" or localise)
        timing[f"{split}_images_per_s"] = len(images) / (time.perf_counter() - tic)
        index.assign(score=scores).to_csv(out_dir / f"{split}.csv", index=False)
        if split == "test":
            np.savez_compressed(out_dir / "test_maps.npz", **maps)
        elif localise:
            masks = np.load(masks_path, mmap_mode="r")
            sick = (index["label"].to_numpy() == 1) & (np.asarray(masks).reshape(len(masks), -1)
                                                         .any(axis=1))
            result = {name: pixel_auroc(maps[name][sick].astype(np.float32), masks[sick])
                      for name in MAP_NAMES if name in maps and sick.any()}
            (out_dir / "val_localisation.json").write_text(json.dumps(result, indent=1))
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=1))
