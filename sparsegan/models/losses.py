"""The losses of Sparse-GAN (Sec. 2.2-2.3), each in one place.

``L = lambda_re * L_re + lambda_adv * max_D L_adv + lambda_sp * L_sp`` is assembled in
:meth:`sparsegan.models.sparse_gan.ReconstructionDetector.train_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """L_re = mean |I_in - I_re| (L1, pix2pix's choice; the paper only says "reconstruction")."""
    return (image - reconstruction).abs().mean()


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """-L_adv of eq. 2 for D: -(log D(I_in) + log(1 - D(I_re))), as binary cross-entropy."""
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))) / 2


def generator_adversarial_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """G's side of eq. 2 in the non-saturating form -log D(I_re) (Goodfellow et al. 2014)."""
    return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))


def sparse_coding_loss(latent: torch.Tensor, code: torch.Tensor, reconstructed_latent: torch.Tensor,
                       l1: float) -> torch.Tensor:
    """L_scl(W_d, s) = ||H - W_d s||^2 + lambda ||s||_1 (eq. 3), averaged over the batch.

    Both terms are divided by the latent's size C*h*w (per-entry means), so that the paper's
    lambda_sp = 50 weighs L_sp against the per-pixel L_re the same way at every image size and width.
    """
    return (latent - reconstructed_latent).pow(2).mean() + l1 * code.abs().mean()
