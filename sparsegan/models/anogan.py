"""AnoGAN, the "AnoGAN" row of Table 1.

Schlegl, Seeböck, Waldstein, Schmidt-Erfurth, Langs: "Unsupervised Anomaly Detection with
Generative Adversarial Networks to Guide Marker Discovery", IPMI 2017 (arXiv:1703.05921).

Training: a DCGAN on normal images only. G: (B, latent_dim) z ~ N(0, I) -> (B, 1, S, S) image
(:class:`~sparsegan.models.gan_parts.Generator`); D: the shared batch-norm
:class:`~sparsegan.models.networks.Discriminator`, which also gives the feature map f(x)
(B, C, h, w) used below.

Scoring (the paper's "mapping new images to the latent space", a gradient search over z per
query image) is :func:`sparsegan.anomaly.anogan_search`; its knobs are ``score.anogan``.
"""

from __future__ import annotations

import torch

from ..params import AnoganParams, ModelParams, Params
from .base import Detector
from .gan_parts import Generator, frozen
from .losses import discriminator_loss, generator_adversarial_loss
from .networks import Discriminator


class AnoGAN(Detector):
    """DCGAN + per-image latent search. Phases: ``["gan"] * epochs``."""

    name = "anogan"

    def __init__(self, image_size: int, model: ModelParams, p: AnoganParams):
        super().__init__()
        self.p, self.image_size = p, image_size
        norm = model.norm  # batch | none
        self.generator = Generator(image_size, model.base_channels, p.latent_dim, norm=norm)
        self.discriminator = Discriminator(image_size, model.base_channels, norm=norm)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        betas = (0.5, 0.999)  # DCGAN (Radford et al. 2016)
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=self.p.lr, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=self.p.lr,
                                              betas=betas),
        }

    def phases(self) -> list[str]:
        return ["gan"] * self.p.epochs

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        """One D step, then one G step (DCGAN, non-saturating G loss -log D(G(z)))."""
        if phase != "gan":
            raise ValueError(f"AnoGAN has only the 'gan' phase, got {phase!r}")
        fake = self.generator(self.generator.sample_z(x.shape[0], x.device))  # (B, 1, S, S)
        # D: -[log D(x) + log(1 - D(G(z)))], real and fake in separate batches (own BN statistics)
        d = self.update("discriminator", discriminator_loss(self.discriminator(x)[0],
                                                            self.discriminator(fake.detach())[0]))
        # G: -log D(G(z)) against the updated D; D's parameters need no gradient here
        with frozen(self.discriminator, eval_mode=False):
            g_loss = generator_adversarial_loss(self.discriminator(fake)[0])
        return {"d": d, "g": self.update("generator", g_loss)}


def build(name: str, params: Params, image_size: int) -> AnoGAN:
    """The ``anogan`` entry of :data:`sparsegan.spec.MODEL_SPECS`."""
    return AnoGAN(image_size, params.model, params.anogan)
