"""Sparse-GAN and the generator-based models of Table 1 as configurations of one model.

===========  ===========  ==========  ==============================================
model        adversarial  SRN (L_sp)  Table 1's rows (trained model, score)
===========  ===========  ==========  ==============================================
autoencoder  no           no          "Auto-Encoder" (image)
pix2pix      yes          no          "pix2pix #1" (image), "pix2pix #2" (latent)
sparse_gan   yes          yes         "Sparse-GAN" (latent)
===========  ===========  ==========  ==============================================

Both scores of each model (image MSE, latent eq. 4) come from :mod:`sparsegan.scoring`.

``H_in = G_en(I_in)``, ``I_re = G_de(H_in)``, ``H_re = E(I_re)`` with E = G_en (the same module, so
the same weights, as the paper's "E shares the same values with G_en").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..params import ModelParams, Params, SrnParams, TrainParams
from .base import Detector
from .gan_parts import frozen
from .losses import (discriminator_loss, generator_adversarial_loss, reconstruction_loss,
                     sparse_coding_loss)
from .networks import Decoder, Discriminator, Encoder, SparsityRegularizationNet, latent_shape


@dataclass(frozen=True)
class ReconstructionConfig:
    name: str  # the model's sparsegan/spec.py name
    adversarial: bool
    sparsity: bool


CONFIGS = {c.name: c for c in (
    ReconstructionConfig("autoencoder", adversarial=False, sparsity=False),
    ReconstructionConfig("pix2pix", adversarial=True, sparsity=False),
    ReconstructionConfig("sparse_gan", adversarial=True, sparsity=True))}


def lr_schedule(epochs: int, decay: float) -> Callable[[int], float]:
    """pix2pix's learning-rate schedule (Isola et al. 2017; the paper is silent): the factor of
    ``train.lr`` in epoch e (0-based) is 1 for the first epochs, then falls linearly over the last
    ``round(decay * epochs)`` of them, to ``1 / (n_decay + 1)`` in the final epoch.

    Why: with a constant lr the adversarial variants end wherever the last GAN oscillation left
    them; decaying over the second half gave higher validation AUCs on synthetic and on real scans
    (numbers in the README). AnoGAN and f-AnoGAN keep their papers' constant rates.
    """
    n_decay = round(decay * epochs)

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - (epochs - n_decay)) / (n_decay + 1)

    return factor


class ReconstructionDetector(Detector):
    """G = G_de o G_en, an optional image discriminator D and an optional SRN."""

    def __init__(self, config: ReconstructionConfig, image_size: int, model: ModelParams,
                 train: TrainParams, srn: SrnParams = SrnParams()):
        super().__init__()
        self.config, self.train_params, self.image_size = config, train, image_size
        self.name = config.name
        norm = model.norm  # batch | none (no batch norm in G and D)
        self.encoder = Encoder(image_size, model.base_channels, norm=norm)  # G_en, and E
        self.decoder = Decoder(image_size, model.base_channels, norm=norm)  # G_de
        self.discriminator = (Discriminator(image_size, model.base_channels, norm=norm)
                              if config.adversarial else None)
        channels = latent_shape(image_size, model.base_channels)[0]
        self.srn = (SparsityRegularizationNet(channels, srn.code_channels or channels,
                                              srn.steps, srn.l1, unit_atoms=srn.unit_atoms)
                    if config.sparsity else None)
        self.srn_scale_invariant = srn.scale_invariant

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        train, betas = self.train_params, (self.train_params.beta1, 0.999)
        g_params = [p for m in (self.encoder, self.decoder, self.srn) if m is not None
                    for p in m.parameters()]
        optimizers = {"generator": torch.optim.Adam(g_params, lr=train.lr, betas=betas)}
        if self.discriminator is not None:
            optimizers["discriminator"] = torch.optim.Adam(
                self.discriminator.parameters(), lr=train.lr, betas=betas)
        return optimizers

    def make_schedulers(self, optimizers: dict[str, torch.optim.Optimizer]
                        ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """pix2pix's schedule (:func:`lr_schedule`), stepped once per epoch by the trainer."""
        factor = lr_schedule(self.train_params.epochs, self.train_params.lr_decay)
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, factor)
                for name, opt in optimizers.items()}

    def phases(self) -> list[str]:
        return ["generator"] * self.train_params.epochs

    def sparsity_loss(self, latent: torch.Tensor) -> torch.Tensor:
        """L_sp = L_scl(W_d, S(H_in)): its gradient trains the SRN and reaches G_en.

        With ``srn.scale_invariant`` H_in is first divided by its per-image RMS (the gradient
        flows through the division), so L_sp measures how sparsely H can be coded, not its size.
        """
        if self.srn_scale_invariant:
            latent = latent / latent.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        code = self.srn(latent)
        return sparse_coding_loss(latent, code, self.srn.reconstruct(code), self.srn.l1)

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        t = self.train_params
        latent = self.encoder(x)  # H_in, (B, C, h, w)
        reconstruction = self.decoder(latent)  # I_re, (B, 1, S, S)
        losses: dict[str, float] = {}
        if self.discriminator is not None:  # max_D L_adv: one D step, then one G step
            real_logit, _ = self.discriminator(x)
            fake_logit, _ = self.discriminator(reconstruction.detach())
            losses["d"] = self.update("discriminator", discriminator_loss(real_logit, fake_logit))
        re = reconstruction_loss(x, reconstruction)
        total = t.lambda_re * re
        parts = {"re": re}
        if self.discriminator is not None:
            # D's parameters need no gradient in the G step (saves D's weight-gradient convs);
            # D stays in training mode (its batch statistics, as in the D step)
            with frozen(self.discriminator, eval_mode=False):
                parts["adv"] = generator_adversarial_loss(self.discriminator(reconstruction)[0])
            total = total + t.lambda_adv * parts["adv"]
        if self.srn is not None:
            parts["sp"] = self.sparsity_loss(latent)
            total = total + t.lambda_sp * parts["sp"]
        losses.update({k: float(v.detach()) for k, v in parts.items()})
        losses["g"] = self.update("generator", total)
        return losses


def build(name: str, params: Params, image_size: int) -> ReconstructionDetector:
    """The reconstruction models of :data:`sparsegan.spec.MODEL_SPECS` (``autoencoder``,
    ``pix2pix``, ``sparse_gan``): one detector, configured by :data:`CONFIGS`."""
    return ReconstructionDetector(CONFIGS[name], image_size, params.model, params.train, params.srn)
