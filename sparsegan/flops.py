"""Training compute, counted: FLOPs of a model's training steps by ``torch.utils.flop_counter``'s
formulas (matmuls and convolutions, forward and backward; elementwise ops count 0).

Used by the benchmark (``scripts/bench.py``, ``scripts/gpu_check.py``) and by the scale study
(:mod:`sparsegan.studies.scale`), which puts each arm on a training-compute axis.
"""

from __future__ import annotations

from typing import Callable

import torch

from .params import Params


def count_flops(fn: Callable[[], object], steps: int) -> float:
    """FLOPs of ``steps`` calls of ``fn``. A plain dispatch mode, not ``FlopCounterMode``, whose
    module tracker refuses ``autograd.grad`` (f-AnoGAN's gradient penalty)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        for _ in range(steps):
            fn()
    return Count.total


def training_flops(model: str, params: Params, image_size: int, n_train: int,
                   batch: int = 4) -> float:
    """FLOPs of ``model``'s whole training schedule under ``params``: per phase (e.g. f-AnoGAN's
    ``gan`` and ``encoder``) the FLOPs of a training step per image (over a group of
    ``n_critic`` steps for f-AnoGAN's GAN phase), measured on a batch of
    ``batch`` random images on CPU, times the phase's epochs times ``n_train`` images."""
    from .train import setup_detector, train_step

    device = torch.device("cpu")
    detector = setup_detector(model, 0, params, image_size, device)
    x = torch.rand(batch, 1, image_size, image_size) * 2 - 1
    epochs = detector.phases()
    total = 0.0
    for phase in dict.fromkeys(epochs):
        # f-AnoGAN's G step comes once per n_critic critic steps: count a whole group
        group = getattr(detector.p, "n_critic", 1) if phase == "gan" else 1
        per_image = count_flops(lambda: train_step(detector, x, phase, device), group) / (
            group * batch)
        total += per_image * epochs.count(phase) * n_train
    return total
