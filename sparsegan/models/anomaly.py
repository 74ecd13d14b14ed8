"""Anomaly scores (eq. 4) and the Anomaly Activation Map (eq. 8 and the channel-wise product)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
