"""The anomaly scores of every row and the anomaly maps: the latent score (eq. 4), the image
score, AnoGAN's latent search, f-AnoGAN's izif score, the Anomaly Activation Map (eq. 8) and
its residual form. Scoring only: nothing here is imported by training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.gan_parts import frozen


def latent_anomaly_score(latent: torch.Tensor, latent_re: torch.Tensor) -> torch.Tensor:
    """A(I_in) = ||H_in - H_re||_2 over all C*h*w entries of each image (eq. 4): (B,)."""
    return (latent - latent_re).flatten(1).norm(dim=1)


def image_anomaly_score(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Image-level reconstruction error mean (I_in - I_re)^2 per image (Auto-Encoder, pix2pix #1): (B,).

    The paper names only "image reconstruction error". Squared, not L1 (the training loss L_re):
    a lesion leaves a few large residuals, the normal texture many small ones, and squaring
    weighs the former; it gave the higher *validation* AUC on synthetic data and matched L1 on
    real scans (README, "What was wrong on real scans").
    """
    return (image - reconstruction).square().flatten(1).mean(dim=1)


def difference_map(image: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """|I_in - I_re| ("Diff" in Fig. 3): (B, 1, S, S)."""
    return (image - reconstruction).abs().mean(dim=1, keepdim=True)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (1, S, S) map of a (B, 1, S, S) batch to [0, 1]."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return ((flat - lo[:, None]) / (hi - lo).clamp_min(1e-12)[:, None]).view_as(maps)


def aam_weights(latent: torch.Tensor, latent_re: torch.Tensor) -> torch.Tensor:
    """W_aam = |GAP(H_in) - GAP(H_re)| (eq. 8): (B, C, h, w) twice -> (B, C)."""
    return (latent.mean(dim=(2, 3)) - latent_re.mean(dim=(2, 3))).abs()


def _channel_weighted_map(weights: torch.Tensor, features: torch.Tensor,
                          size: int) -> torch.Tensor:
    """sum_c weights[c] * features[c], upsampled bilinearly to (B, 1, size, size), in [0, 1]."""
    heat = torch.einsum("bc,bchw->bhw", weights, features)[:, None]  # (B, 1, h, w)
    heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)
    return normalize_maps(heat)


def anomaly_activation_map(latent: torch.Tensor, latent_re: torch.Tensor,
                           size: int) -> torch.Tensor:
    """AAM (the paper): (B, C, h, w) H_in and H_re -> (B, 1, size, size) in [0, 1].

    W_aam (eq. 8) weighs each latent channel by how much its global response changed under
    reconstruction; AAM = sum_c W_aam[c] * H_in[c], upsampled bilinearly to the input size and
    min-max normalised per image.
    """
    return _channel_weighted_map(aam_weights(latent, latent_re), latent, size)


def residual_activation_map(latent: torch.Tensor, latent_re: torch.Tensor,
                            size: int) -> torch.Tensor:
    """Our addition, not the paper's: sum_c W_aam[c] * |H_in[c] - H_re[c]|, the same W_aam on the
    latent *residual* that eq. 4 sums, so the map is high where the score comes from.

    Why: the paper's product with H_in shows where the changed channels *respond*, which need not
    be the lesion: against the synthetic lesion masks the AAM lights up the dark background and
    this map localises (pixel AUROC of each map: reports/metrics.json, README).
    """
    return _channel_weighted_map(aam_weights(latent, latent_re), (latent - latent_re).abs(), size)


def izif_score(image_mse: torch.Tensor, feature_mse: torch.Tensor, kappa: float) -> torch.Tensor:
    """f-AnoGAN's score A(x) = A_R(x) + kappa * A_D(x) (Schlegl et al. 2019), from the per-image
    pixel and feature MSEs of :meth:`sparsegan.models.fanogan.FAnoGAN.izif`: (B,)."""
    return image_mse + kappa * feature_mse


def anogan_initial_z(n: int, latent_dim: int, init: str, device: torch.device | str) -> torch.Tensor:
    """z_1 of AnoGAN's search, (n, latent_dim), the same row for every image: one draw of
    N(0, I) from a generator seeded with 0 ("sample"), or zeros. A fixed row (not one draw per
    image) keeps each image's score independent of its batch and position. Zeros is the prior's
    mean but an atypical z in high dimension, and a dead start for an untrained G (ReLU at 0)."""
    if init == "zeros":
        return torch.zeros(n, latent_dim, device=device)
    rng = torch.Generator().manual_seed(0)
    return torch.randn(1, latent_dim, generator=rng).to(device).expand(n, -1).clone()


def anogan_loss(generator, discriminator, x: torch.Tensor, feat_x: torch.Tensor, z: torch.Tensor,
                weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AnoGAN's overall loss per image (Schlegl et al. 2017), (B,), and G(z) (B, 1, S, S)::

        L_R(z) = sum |x - G(z)|                 residual loss (sum over the S*S pixels)
        L_D(z) = sum |f(x) - f(G(z))|           discrimination loss with feature matching (the
                                                paper's improved form; sum over C*h*w features)
        L(z)   = (1 - l) * L_R(z) + l * L_D(z)  l = ``weight`` (0.1 in the paper)

    Sums as in the paper, not means: Adam's steps do not depend on the loss's scale, and with our
    depth rule C*h*w = S*S at S=64, b=16 and at S=224, b=64, so sums weigh the terms as means
    would. ``feat_x`` = f(x), D's last feature map of the query."""
    generated = generator(z)
    residual = (x - generated).abs().flatten(1).sum(dim=1)  # L_R
    feat_g = discriminator(generated)[1]
    discrimination = (feat_x - feat_g).abs().flatten(1).sum(dim=1)  # L_D
    return (1 - weight) * residual + weight * discrimination, generated


def anogan_search(generator, discriminator, x: torch.Tensor, latent_dim: int, steps: int,
                  lr: float, init: str, weight: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AnoGAN's mapping of queries to the latent space: Gamma = ``steps`` Adam steps (``lr``) on z
    per image of ``x`` (B, 1, S, S), minimising :func:`anogan_loss`, G and D frozen in eval mode.
    The score is A(x) = L(z_Gamma).

    The search runs on the whole batch at once: the minimised objective is sum_i L_i(z_i), whose
    gradient with respect to z_i is that of L_i alone, and Adam is element-wise, so every image
    has its own independent search. Returns z* (B, latent_dim), L(z*) (B,) and G(z*). Works under
    an outer ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad(), frozen(generator, discriminator):
        x = x.detach().clone() if x.is_inference() else x.detach()
        with torch.no_grad():
            feat_x = discriminator(x)[1]
        z = anogan_initial_z(x.shape[0], latent_dim, init, x.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            loss, _ = anogan_loss(generator, discriminator, x, feat_x, z, weight)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # sum_i L_i(z_i): each z_i gets the gradient of its own L_i
            opt.step()
        with torch.no_grad():
            loss, generated = anogan_loss(generator, discriminator, x, feat_x, z, weight)
    return z.detach(), loss, generated
