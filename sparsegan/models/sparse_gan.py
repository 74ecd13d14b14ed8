"""Sparse-GAN and the generator-based rows of Table 1 as configurations of one model.

=================  ===========  ==========  ================  =====================
variant            adversarial  SRN (L_sp)  anomaly score     paper
=================  ===========  ==========  ================  =====================
autoencoder        no           no          image (MSE)       "Auto-Encoder"
pix2pix_image      yes          no          image (MSE)       "pix2pix #1"
pix2pix_latent     yes          no          latent (eq. 4)    "pix2pix #2"
sparse_gan         yes          yes         latent (eq. 4)    "Sparse-GAN"
=================  ===========  ==========  ================  =====================

``H_in = G_en(I_in)``, ``I_re = G_de(H_in)``, ``H_re = E(I_re)`` with E = G_en (the same module, so
the same weights, as the paper's "E shares the same values with G_en").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import unwrap
from ..params import ModelParams, SrnParams, TrainParams
from .anomaly import (anomaly_activation_map, difference_map, image_anomaly_score,
                      latent_anomaly_score, residual_activation_map)
from .base import Detector, ScoreOutput
from .gan_parts import frozen
from .losses import (discriminator_loss, generator_adversarial_loss, reconstruction_loss,
                     sparse_coding_loss)
from .networks import Decoder, Discriminator, Encoder, SparsityRegularizationNet, latent_shape


@dataclass(frozen=True)
class ReconstructionConfig:
    adversarial: bool
    sparsity: bool
    score_level: str  # "image" or "latent"


CONFIGS = {
    "autoencoder": ReconstructionConfig(adversarial=False, sparsity=False, score_level="image"),
    "pix2pix_image": ReconstructionConfig(adversarial=True, sparsity=False, score_level="image"),
    "pix2pix_latent": ReconstructionConfig(adversarial=True, sparsity=False, score_level="latent"),
    "sparse_gan": ReconstructionConfig(adversarial=True, sparsity=True, score_level="latent"),
}


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
        betas = (train.beta1, 0.999)
        g_params = [p for m in (self.encoder, self.decoder, self.srn) if m is not None
                    for p in m.parameters()]
        self._optimizers = {"generator": torch.optim.Adam(g_params, lr=train.lr, betas=betas)}
        if self.discriminator is not None:
            self._optimizers["discriminator"] = torch.optim.Adam(
                self.discriminator.parameters(), lr=train.lr, betas=betas)
        factor = lr_schedule(train.epochs, train.lr_decay)
        self._schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, factor)
                            for name, opt in self._optimizers.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Stepped once per epoch by the training loop (:func:`lr_schedule`)."""
        return self._schedulers

    def phases(self) -> list[str]:
        return ["generator"] * self.train_params.epochs

    def sparsity_loss(self, latent: torch.Tensor) -> torch.Tensor:
        """L_sp = L_scl(W_d, S(H_in)): its gradient trains the SRN and reaches G_en.

        With ``srn.scale_invariant`` H_in is first divided by its per-image RMS (the gradient
        flows through the division), so L_sp measures how sparsely H can be coded, not its size.
        """
        if self.srn_scale_invariant:
            latent = latent / latent.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        code = self.srn(latent)  # through DDP's forward when distributed
        # W_d (reconstruct) and l1 live on the bare SRN; W_d's gradient still reaches DDP's hooks
        srn = unwrap(self.srn)
        return sparse_coding_loss(latent, code, srn.reconstruct(code), srn.l1)

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        t = self.train_params
        latent = self.encoder(x)  # H_in, (B, C, h, w)
        reconstruction = self.decoder(latent)  # I_re, (B, 1, S, S)
        losses: dict[str, torch.Tensor] = {}
        if self.discriminator is not None:  # max_D L_adv: one D step, then one G step
            real_logit, _ = self.discriminator(x)
            fake_logit, _ = self.discriminator(reconstruction.detach())
            losses["d"] = discriminator_loss(real_logit, fake_logit)
            opt_d = self._optimizers["discriminator"]
            opt_d.zero_grad(set_to_none=True)
            losses["d"].backward()
            opt_d.step()
        losses["re"] = reconstruction_loss(x, reconstruction)
        total = t.lambda_re * losses["re"]
        if self.discriminator is not None:
            # D's parameters need no gradient in the G step (saves D's weight-gradient convs);
            # D stays in training mode (its batch statistics, as in the D step); the bare D, not
            # its DDP wrapper (distributed): frozen, it has no gradient for DDP to reduce
            discriminator = unwrap(self.discriminator)
            with frozen(discriminator, eval_mode=False):
                losses["adv"] = generator_adversarial_loss(discriminator(reconstruction)[0])
            total = total + t.lambda_adv * losses["adv"]
        if self.srn is not None:
            losses["sp"] = self.sparsity_loss(latent)
            total = total + t.lambda_sp * losses["sp"]
        losses["g"] = total
        opt_g = self._optimizers["generator"]
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> ScoreOutput:
        latent = self.encoder(x)  # H_in
        reconstruction = self.decoder(latent)  # I_re
        maps = {"difference": difference_map(x, reconstruction)}
        if self.config.score_level == "latent":
            latent_re = self.encoder(reconstruction)  # H_re = E(I_re), E = G_en
            score = latent_anomaly_score(latent, latent_re)  # eq. 4
            maps["aam"] = anomaly_activation_map(latent, latent_re, x.shape[-1])  # eq. 8
            maps["aam_residual"] = residual_activation_map(latent, latent_re, x.shape[-1])
        else:
            score = image_anomaly_score(x, reconstruction)
        return ScoreOutput(score=score, reconstruction=reconstruction, maps=maps)
