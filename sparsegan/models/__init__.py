"""Variants of Table 1, built by name from the shared parts."""

from __future__ import annotations

from ..params import Params
from .base import Detector, ScoreOutput
from .sparse_gan import CONFIGS, ReconstructionDetector

__all__ = ["Detector", "ScoreOutput", "build_detector"]


def build_detector(variant: str, params: Params, image_size: int) -> Detector:
    """A fresh, untrained detector for ``variant`` (one of :data:`sparsegan.params.VARIANTS`)."""
    if variant in CONFIGS:
        return ReconstructionDetector(CONFIGS[variant], image_size, params.model, params.train,
                                      params.srn)
    if variant == "anogan":
        from .anogan import AnoGAN
        return AnoGAN(image_size, params.model, params.anogan)
    if variant == "fanogan":
        from .fanogan import FAnoGAN
        return FAnoGAN(image_size, params.model, params.fanogan)
    raise ValueError(f"unknown variant {variant!r}")
