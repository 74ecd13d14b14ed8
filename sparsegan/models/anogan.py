"""AnoGAN, the "AnoGAN" row of Table 1.

Schlegl, Seeböck, Waldstein, Schmidt-Erfurth, Langs: "Unsupervised Anomaly Detection with
Generative Adversarial Networks to Guide Marker Discovery", IPMI 2017 (arXiv:1703.05921).

Training: a DCGAN on normal images only. G: (B, latent_dim) z ~ N(0, I) -> (B, 1, S, S) image
(:class:`~sparsegan.models.gan_parts.Generator`); D: the shared batch-norm
:class:`~sparsegan.models.networks.Discriminator`, which also gives the feature map f(x)
(B, C, h, w) used below.

Scoring (the paper's "mapping new images to the latent space"): for each query image x, search
the z whose G(z) is closest to x by Gamma = ``search_steps`` Adam steps on z (lr ``search_lr``;
G and D fixed, in eval mode), minimising per image

    L_R(z) = sum |x - G(z)|                      residual loss (sum over the S*S pixels)
    L_D(z) = sum |f(x) - f(G(z))|                discrimination loss, the paper's improved form
                                                 with feature matching (sum over the C*h*w features)
    L(z)   = (1 - l) * L_R(z) + l * L_D(z)       overall loss, l = ``weight`` (0.1 in the paper)

The anomaly score is A(x) = (1 - l) R(x) + l D(x) = L(z_Gamma), the overall loss at the last z.
Sums as in the paper, not means: Adam's steps do not depend on the loss's scale, and with our
depth rule C*h*w = S*S at S=64, b=16 and at S=224, b=64, so sums weigh the terms as means would.

The search runs on the whole batch at once: z is (B, latent_dim), the minimised objective is
sum_i L_i(z_i), whose gradient with respect to z_i is that of L_i alone, and Adam is element-wise,
so every image has its own independent search. The start z_1 is one seeded draw of the prior
shared by all images (or zeros; ``search_init``), so scores are reproducible and do not depend on
the batch an image is scored in.
"""

from __future__ import annotations

import torch

from ..distributed import unwrap
from ..params import AnoganParams, ModelParams
from .anomaly import difference_map
from .base import Detector, ScoreOutput
from .gan_parts import Generator, frozen
from .losses import discriminator_loss, generator_adversarial_loss
from .networks import Discriminator


class AnoGAN(Detector):
    """DCGAN + per-image latent search. Phases: ``["gan"] * epochs``."""

    def __init__(self, image_size: int, model: ModelParams, p: AnoganParams):
        super().__init__()
        self.p, self.image_size = p, image_size
        norm = model.norm  # batch | none
        self.generator = Generator(image_size, model.base_channels, p.latent_dim, norm=norm)
        self.discriminator = Discriminator(image_size, model.base_channels, norm=norm)
        betas = (0.5, 0.999)  # DCGAN (Radford et al. 2016)
        self._optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=p.lr, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=p.lr,
                                              betas=betas),
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def phases(self) -> list[str]:
        return ["gan"] * self.p.epochs

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        """One D step, then one G step (DCGAN, non-saturating G loss -log D(G(z)))."""
        if phase != "gan":
            raise ValueError(f"AnoGAN has only the 'gan' phase, got {phase!r}")
        # (B, 1, S, S); self.generator is G's DDP wrapper when distributed (unwrap: the bare G)
        fake = self.generator(unwrap(self.generator).sample_z(x.shape[0], x.device))
        # D: -[log D(x) + log(1 - D(G(z)))], real and fake in separate batches (own BN statistics)
        d_loss = discriminator_loss(self.discriminator(x)[0], self.discriminator(fake.detach())[0])
        opt_d = self._optimizers["discriminator"]
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # G: -log D(G(z)) against the updated D; D's parameters need no gradient here (the bare
        # D, not its DDP wrapper: nothing to reduce)
        discriminator = unwrap(self.discriminator)
        with frozen(discriminator, eval_mode=False):
            g_loss = generator_adversarial_loss(discriminator(fake)[0])
        opt_g = self._optimizers["generator"]
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d": float(d_loss.detach()), "g": float(g_loss.detach())}

    def initial_z(self, n: int, device: torch.device | str) -> torch.Tensor:
        """z_1 of the search, (n, latent_dim), the same row for every image: one draw of N(0, I)
        from a generator seeded with 0 ("sample"), or zeros. A fixed row (not one draw per image)
        keeps each image's score independent of its batch and position. Zeros is the prior's mean
        but an atypical z in high dimension, and a dead start for an untrained G (ReLU at 0)."""
        if self.p.search_init == "zeros":
            return torch.zeros(n, self.p.latent_dim, device=device)
        rng = torch.Generator().manual_seed(0)
        return torch.randn(1, self.p.latent_dim, generator=rng).to(device).expand(n, -1).clone()

    def search_loss(self, x: torch.Tensor, feat_x: torch.Tensor,
                    z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image overall loss L(z) (B,) and G(z) (B, 1, S, S); feat_x = f(x) (B, C, h, w)."""
        generated = self.generator(z)
        residual = (x - generated).abs().flatten(1).sum(dim=1)  # L_R
        feat_g = self.discriminator(generated)[1]
        discrimination = (feat_x - feat_g).abs().flatten(1).sum(dim=1)  # L_D, feature matching
        return (1 - self.p.weight) * residual + self.p.weight * discrimination, generated

    def search(self, x: torch.Tensor, steps: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient search over z for each image of ``x`` (B, 1, S, S), G and D frozen in eval mode.

        Returns z* (B, latent_dim), the final per-image loss L(z*) (B,) and G(z*) (B, 1, S, S).
        Works under an outer ``torch.no_grad()`` or ``torch.inference_mode()``.
        """
        steps = self.p.search_steps if steps is None else steps
        with torch.inference_mode(False), torch.enable_grad(), \
                frozen(self.generator, self.discriminator):
            x = x.detach().clone() if x.is_inference() else x.detach()
            with torch.no_grad():
                feat_x = self.discriminator(x)[1]
            z = self.initial_z(x.shape[0], x.device).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.p.search_lr)
            for _ in range(steps):
                loss, _ = self.search_loss(x, feat_x, z)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()  # sum_i L_i(z_i): each z_i gets the gradient of its own L_i
                opt.step()
            with torch.no_grad():
                loss, generated = self.search_loss(x, feat_x, z)
        return z.detach(), loss, generated

    def score(self, x: torch.Tensor) -> ScoreOutput:
        """A(x) = L(z*), maps {"difference": |x - G(z*)|}, reconstruction G(z*)."""
        _, loss, generated = self.search(x)
        return ScoreOutput(score=loss, reconstruction=generated,
                           maps={"difference": difference_map(x, generated)})
