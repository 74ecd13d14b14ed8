"""The trained models of Table 1, built by name: each model's module (its
:class:`~sparsegan.spec.ModelSpec` ``module``) has ``build(name, params, image_size)``."""

from __future__ import annotations

import importlib

from ..params import Params
from ..spec import SPECS
from .base import Detector

__all__ = ["Detector", "build_detector"]


def build_detector(model: str, params: Params, image_size: int) -> Detector:
    """A fresh, untrained detector for ``model`` (a name of :data:`sparsegan.spec.MODEL_SPECS`),
    built by ``build`` of the module its spec names; its ``name`` must be ``model`` (scoring
    finds its scorer by it)."""
    if model not in SPECS:
        raise ValueError(f"unknown model {model!r}: sparsegan/spec.py has {', '.join(SPECS)}")
    module = importlib.import_module(f"{__name__}.{SPECS[model].module}")
    detector = module.build(model, params, image_size)
    if detector.name != model:
        raise ValueError(f"sparsegan/models/{SPECS[model].module}.py built a detector named "
                         f"{detector.name!r} for model {model!r}; set its name")
    return detector
