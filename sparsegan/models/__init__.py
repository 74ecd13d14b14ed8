"""The trained models of Table 1, built by name from the shared parts."""

from __future__ import annotations

from ..params import Params
from .base import Detector
from .sparse_gan import CONFIGS, ReconstructionDetector

__all__ = ["Detector", "build_detector"]


def build_detector(model: str, params: Params, image_size: int) -> Detector:
    """A fresh, untrained detector for ``model`` (one of :data:`sparsegan.params.MODELS`)."""
    if model in CONFIGS:
        return ReconstructionDetector(CONFIGS[model], image_size, params.model, params.train,
                                      params.srn)
    if model == "anogan":
        from .anogan import AnoGAN
        return AnoGAN(image_size, params.model, params.anogan)
    if model == "fanogan":
        from .fanogan import FAnoGAN
        return FAnoGAN(image_size, params.model, params.fanogan)
    raise ValueError(f"unknown model {model!r}")
