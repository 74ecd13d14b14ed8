"""f-AnoGAN, the "f-AnoGAN" row of Table 1.

Schlegl, Seeböck, Waldstein, Langs, Schmidt-Erfurth: "f-AnoGAN: Fast unsupervised anomaly
detection with generative adversarial networks", Medical Image Analysis 54, 2019.

Phase ``gan``: a WGAN-GP (Gulrajani et al. 2017) on normal images. Generator G: (B, latent_dim)
z ~ N(0, I) -> (B, 1, S, S) (:class:`~sparsegan.models.gan_parts.Generator`); critic D: the shared
:class:`~sparsegan.models.networks.Discriminator` with ``norm="none"`` (the gradient penalty is
per sample, so no batch norm), whose last feature map is f(x), (B, C, h, w).
Every ``train_step`` is one critic step; every ``n_critic``-th one is followed by one G step:

    L_D = mean D(G(z)) - mean D(x) + gp_weight * GP        critic loss, Gulrajani et al. eq. 3
    L_G = -mean D(G(z))

Phase ``encoder`` (the paper's "izi_f" encoder training): G and D frozen (eval mode), an encoder
E: image -> z is trained to minimise, for images x with n = S*S pixels and n_d = C*h*w features,

    L_izif = 1/n ||x - G(E(x))||^2 + kappa / n_d ||f(x) - f(G(E(x)))||^2

i.e. the pixel MSE plus kappa times the feature MSE, averaged over the batch. E is the shared
:class:`~sparsegan.models.networks.Encoder` plus a linear head to latent_dim. The head has no tanh:
our G is trained on z ~ N(0, I), and tanh would confine E(x) to [-1, 1]^d, a small part of the
prior's mass.

Score (the paper's anomaly score, :func:`sparsegan.anomaly.izif_score`): A(x) = A_R(x) + kappa *
A_D(x), the same two terms per image: A_R = 1/n ||x - G(E(x))||^2, A_D = 1/n_d ||f(x) - f(G(E(x)))||^2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..params import FanoganParams, ModelParams, Params
from .base import Detector
from .gan_parts import Generator, frozen, gradient_penalty
from .networks import Discriminator, Encoder, _init_weights, latent_shape


class LatentEncoder(nn.Module):
    """E: (B, 1, S, S) image -> (B, latent_dim) z; shared Encoder then a linear head (no tanh)."""

    def __init__(self, image_size: int, base_channels: int, latent_dim: int,
                 norm: str = "batch"):
        super().__init__()
        c, h, w = latent_shape(image_size, base_channels)
        self.features = Encoder(image_size, base_channels, norm=norm)
        self.head = nn.Linear(c * h * w, latent_dim)
        _init_weights(self.head)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


class FAnoGAN(Detector):
    """WGAN-GP + izi_f encoder. Phases: ``["gan"] * epochs + ["encoder"] * encoder_epochs``.

    The buffer ``critic_steps`` counts critic updates (checkpointed with the state dict), so that
    the G-every-``n_critic`` schedule continues across a resumed run.
    """

    name = "fanogan"

    def __init__(self, image_size: int, model: ModelParams, p: FanoganParams):
        super().__init__()
        self.p, self.image_size = p, image_size
        norm = model.norm  # batch | none (the critic never has batch norm)
        self.generator = Generator(image_size, model.base_channels, p.latent_dim, norm=norm)
        self.critic = Discriminator(image_size, model.base_channels, norm="none")
        self.encoder = LatentEncoder(image_size, model.base_channels, p.latent_dim, norm=norm)
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.long))

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        lr, wgan_betas = self.p.lr, (0.0, 0.9)  # WGAN-GP (Gulrajani et al. 2017, Algorithm 1)
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=wgan_betas),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=lr, betas=wgan_betas),
            # the encoder is plain regression against a fixed G: Adam's default betas
            "encoder": torch.optim.Adam(self.encoder.parameters(), lr=lr),
        }

    def phases(self) -> list[str]:
        return ["gan"] * self.p.epochs + ["encoder"] * self.p.encoder_epochs

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        if phase == "gan":
            return self._gan_step(x)
        if phase == "encoder":
            return self._encoder_step(x)
        raise ValueError(f"f-AnoGAN phases are 'gan' and 'encoder', got {phase!r}")

    def _gan_step(self, x: torch.Tensor) -> dict[str, float]:
        """One critic step; a G step too when this is the n_critic-th critic step.

        Logs the same keys every step (the training loop averages them over the epoch): "d" (L_D),
        "gp", "wasserstein" (mean D(x) - mean D(G(z))) and "g", the G objective -mean D(G(z)) on
        this step's fakes before the critic update, whether or not G is updated in this step.
        """
        with torch.no_grad():  # the critic's fakes need no gradient
            fake = self.generator(self.generator.sample_z(x.shape[0], x.device))
        d_real, d_fake = self.critic(x)[0], self.critic(fake)[0]  # (B,) each
        gp = gradient_penalty(self.critic, x, fake)
        d_loss = d_fake.mean() - d_real.mean() + self.p.gp_weight * gp
        losses = {"gp": float(gp.detach()), "wasserstein": float((d_real - d_fake).mean().detach()),
                  "g": float(-d_fake.mean().detach())}
        losses["d"] = self.update("critic", d_loss)
        self.critic_steps += 1
        if int(self.critic_steps) % self.p.n_critic == 0:
            with frozen(self.critic):  # no batch norm in the critic: eval mode changes nothing
                g_loss = -self.critic(self.generator(
                    self.generator.sample_z(x.shape[0], x.device)))[0].mean()
            self.update("generator", g_loss)
        return losses

    def izif(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image pixel MSE A_R (B,), feature MSE A_D (B,) and G(E(x)) (B, 1, S, S)."""
        reconstruction = self.generator(self.encoder(x))
        image_mse = (x - reconstruction).pow(2).flatten(1).mean(dim=1)  # 1/n ||x - G(E(x))||^2
        feat_x, feat_re = self.critic(x)[1], self.critic(reconstruction)[1]
        feature_mse = (feat_x - feat_re).pow(2).flatten(1).mean(dim=1)  # 1/n_d ||f(x) - f(.)||^2
        return image_mse, feature_mse, reconstruction

    def _encoder_step(self, x: torch.Tensor) -> dict[str, float]:
        """One E step on L_izif, G and D frozen in eval mode."""
        with frozen(self.generator, self.critic):
            image_mse, feature_mse, _ = self.izif(x)
            loss = (image_mse + self.p.kappa * feature_mse).mean()
            return {"izif": self.update("encoder", loss),
                    "image_mse": float(image_mse.mean().detach()),
                    "feature_mse": float(feature_mse.mean().detach())}


def build(name: str, params: Params, image_size: int) -> FAnoGAN:
    """The ``fanogan`` entry of :data:`sparsegan.spec.MODEL_SPECS`."""
    return FAnoGAN(image_size, params.model, params.fanogan)
