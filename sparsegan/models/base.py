"""The contract every Table 1 variant implements, so that one training loop and one scorer serve all.

Images enter as float tensors ``(B, 1, S, S)`` scaled to [-1, 1]. A detector trains in *phases*
(most have one; f-AnoGAN has ``gan`` then ``encoder``), one ``train_step`` per batch, and scores a
batch into one anomaly score per image plus image-size anomaly maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ScoreOutput:
    """``score``: (B,) anomaly score, higher = more anomalous.
    ``maps``: name -> (B, 1, S, S) anomaly maps in the input's resolution; every variant gives
    ``"difference"`` (|I_in - I_re|); latent variants also give ``"aam"`` (eq. 8) and
    ``"aam_residual"`` (the same weights on |H_in - H_re|).
    ``reconstruction``: (B, 1, S, S) in [-1, 1]."""

    score: torch.Tensor
    reconstruction: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


class Detector(nn.Module):
    """Base class of all variants."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers ``train_step`` uses, by name (saved in checkpoints)."""
        raise NotImplementedError

    def phases(self) -> list[str]:
        """One entry per training epoch, naming the phase that epoch trains."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        """One optimisation step on a batch of normal images; returns the losses for logging."""
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> ScoreOutput:
        """Anomaly scores and maps for a batch (eval mode; may use autograd, as AnoGAN's search)."""
        raise NotImplementedError
