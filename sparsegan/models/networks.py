"""The shared networks of Sparse-GAN (Zhou et al., ISBI 2020, Fig. 1) and of its Table 1 baselines.

- :class:`Encoder` is ``G_en`` (and, sharing its weights, the encoder ``E``): ``H = G_en(I)``.
- :class:`Decoder` is ``G_de``: ``I_re = G_de(H)``. No skip connections: they would let the image
  bypass the latent space on which the anomaly score (eq. 4) is computed.
- :class:`Discriminator` judges images (real ``I_in`` vs reconstructed ``I_re``), DCGAN-style with
  a global real/fake logit; its intermediate features serve AnoGAN and f-AnoGAN too.
- :class:`SparsityRegularizationNet` is the SRN ``S``: ISTA for convolutional sparse coding of the
  latent map, unrolled for T steps as a convolutional LSTM (the "Sparse LSTM" of Zhou et al.).

Depth rule (docs/design.md, section 1): five stride-2 4x4 blocks take 224 to 7, giving the paper's 1024x7x7
latent with base width 64. For other sizes the number of blocks is the largest n with
``S / 2**n >= 7`` (64 -> 3 blocks, latent 8x8; 128 -> 4 blocks, 8x8), so the latent stays about
7x7 whatever the input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def num_blocks(image_size: int) -> int:
    """Stride-2 blocks such that the latent map is about 7x7 (exactly 7 at 224)."""
    n = int(math.floor(math.log2(image_size / 7)))
    if n < 1 or image_size % (2**n):
        raise ValueError(f"data.image_size = {image_size}: must be at least 16 and divisible by "
                         f"2**{max(n, 1)}; use e.g. 64, 128 or 224")
    return n


def latent_shape(image_size: int, base_channels: int) -> tuple[int, int, int]:
    """(C, h, w) of H = G_en(I): (1024, 7, 7) at 224 with base width 64."""
    n = num_blocks(image_size)
    return base_channels * 2 ** (n - 1), image_size // 2**n, image_size // 2**n


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialisation (N(0, 0.02) convs, N(1, 0.02) BN scales), as pix2pix uses."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


NORMS = ("batch", "none")


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


class Encoder(nn.Module):
    """G_en: (B, 1, S, S) image -> (B, C, h, w) latent H; widths b, 2b, 4b, ... (no BN on the first).

    ``norm`` (``model.norm``): "batch" (pix2pix) or "none" (no batch norm; every conv gets a bias),
    e.g. for data-parallel training on CPU, where batch norm cannot be synchronised."""

    def __init__(self, image_size: int, base_channels: int, in_channels: int = 1,
                 norm: str = "batch"):
        super().__init__()
        batch_norm = _check_norm(norm) == "batch"
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(num_blocks(image_size)):
            c_out = base_channels * 2**i
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0 or not batch_norm))
            if i > 0 and batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.net = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class Decoder(nn.Module):
    """G_de: (B, C, h, w) latent -> (B, 1, S, S) image in [-1, 1]; mirrors the encoder
    (``norm`` as :class:`Encoder`)."""

    def __init__(self, image_size: int, base_channels: int, out_channels: int = 1,
                 norm: str = "batch"):
        super().__init__()
        batch_norm = _check_norm(norm) == "batch"
        n = num_blocks(image_size)
        layers: list[nn.Module] = []
        for i in reversed(range(1, n)):
            c_in, c_out = base_channels * 2**i, base_channels * 2 ** (i - 1)
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        layers += [nn.ConvTranspose2d(base_channels, out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init_weights(self)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)


class Discriminator(nn.Module):
    """D: (B, 1, S, S) image -> (B,) real/fake logit, plus its last feature map for
    feature-matching losses (AnoGAN's discrimination loss, f-AnoGAN's izif_D residual).

    ``norm`` is "batch" (DCGAN/pix2pix) or "none" (WGAN-GP forbids batch norm in the critic,
    since the gradient penalty is per sample)."""

    def __init__(self, image_size: int, base_channels: int, norm: str = "batch"):
        super().__init__()
        self.features = Encoder(image_size, base_channels)
        if _check_norm(norm) == "none":
            self.features.net = nn.Sequential(
                *[m for m in self.features.net if not isinstance(m, nn.BatchNorm2d)])
            for m in self.features.net:
                if isinstance(m, nn.Conv2d) and m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_channels))
        c, h, w = latent_shape(image_size, base_channels)
        self.classifier = nn.Conv2d(c, 1, (h, w))  # one global logit over the whole feature map
        _init_weights(self.classifier)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(image)  # (B, C, h, w)
        return self.classifier(feat).flatten(), feat


def soft_threshold(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Proximal operator of theta * ||.||_1: sign(x) * max(|x| - theta, 0)."""
    return torch.sign(x) * F.relu(x.abs() - theta)


class SparsityRegularizationNet(nn.Module):
    """SRN S: sparse code s of the latent H under the 1x1-conv dictionary W_d (C x K).

    ISTA for ``min_s ||H - W_d s||^2 + lambda ||s||_1`` iterates
    ``s_t = soft(W_e H + U s_{t-1}, theta)`` with ``W_e = 2 W_d^T / L``, ``U = I - 2 W_d^T W_d / L``
    and ``theta = lambda / L``, L = 2 ||W_d||_2^2 the Lipschitz constant of the quadratic's gradient.
    The Sparse LSTM (Zhou et al.) reads this as a recurrent cell and adds gates; following the
    paper we use convolutions instead of element-wise products (3x3 on the latent map), and
    per step::

        i_t, f_t = sigmoid(conv(H) + conv(s_{t-1}))        input / forget gates
        c_t      = f_t * c_{t-1} + i_t * (W_e * H + U * s_{t-1})
        s_t      = soft_threshold(c_t, theta)               learnable per-channel theta

    There is no output gate (the code is the cell's thresholded state). Initialisation makes the
    cell ISTA (LISTA-style): ``W_e``, ``U``, ``theta`` from ``W_d`` and ``lambda`` as above, input
    gate open, forget gate closed; training then adapts every weight.

    ``unit_atoms`` (``srn.unit_atoms``): each atom (column of ``W_d``) is used divided by its
    norm, the usual constraint of dictionary learning: without it the l1 term can be lowered by
    growing the atoms and shrinking the code, whatever the code's sparsity.
    """

    def __init__(self, channels: int, code_channels: int, steps: int, l1: float,
                 gate_kernel: int = 3, unit_atoms: bool = False):
        super().__init__()
        self.steps, self.l1, self.unit_atoms = steps, l1, unit_atoms
        k = code_channels
        self.dictionary = nn.Conv2d(k, channels, 1, bias=False)  # W_d: code (K) -> latent (C)
        nn.init.normal_(self.dictionary.weight, 0.0, 1.0 / math.sqrt(channels))
        self.encode = nn.Conv2d(channels, k, 1, bias=False)  # W_e
        self.mutual = nn.Conv2d(k, k, 1, bias=False)  # U
        pad = gate_kernel // 2
        self.gate_h = nn.Conv2d(channels, 2 * k, gate_kernel, padding=pad)
        self.gate_s = nn.Conv2d(k, 2 * k, gate_kernel, padding=pad, bias=False)
        self.log_theta = nn.Parameter(torch.zeros(1, k, 1, 1))
        self.reset_to_ista()

    @torch.no_grad()
    def reset_to_ista(self) -> None:
        """Set W_e, U, theta and the gates so that the unrolled cell is plain ISTA on W_d."""
        wd = self.atoms()[:, :, 0, 0]  # (C, K)
        lipschitz = 2 * torch.linalg.matrix_norm(wd, ord=2) ** 2  # of grad ||H - W_d s||^2
        k = wd.shape[1]
        self.encode.weight.copy_((2 * wd.T / lipschitz)[:, :, None, None])
        self.mutual.weight.copy_((torch.eye(k) - 2 * wd.T @ wd / lipschitz)[:, :, None, None])
        self.log_theta.fill_(math.log(max(self.l1 / lipschitz, 1e-8)))
        nn.init.zeros_(self.gate_h.weight)
        nn.init.zeros_(self.gate_s.weight)
        self.gate_h.bias[:k].fill_(8.0)  # input gate ~ 1
        self.gate_h.bias[k:].fill_(-8.0)  # forget gate ~ 0

    def forward(self, latent: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """(B, C, h, w) latent H -> (B, K, h, w) sparse code s."""
        theta = self.log_theta.exp()
        drive = self.encode(latent)  # W_e * H, the same every step
        gates_h = self.gate_h(latent)
        s = c = torch.zeros_like(drive)  # s_0 = c_0 = 0
        for _ in range(steps or self.steps):
            i, f = torch.sigmoid(gates_h + self.gate_s(s)).chunk(2, dim=1)
            c = f * c + i * (drive + self.mutual(s))
            s = soft_threshold(c, theta)
        return s

    def atoms(self) -> torch.Tensor:
        """W_d as used, (C, K, 1, 1): unit-norm columns when ``unit_atoms``."""
        w = self.dictionary.weight
        return w / w.flatten(2).norm(dim=0, keepdim=True)[..., None].clamp_min(1e-8) \
            if self.unit_atoms else w

    def reconstruct(self, code: torch.Tensor) -> torch.Tensor:
        """W_d s: (B, K, h, w) -> (B, C, h, w)."""
        if not self.unit_atoms:
            return self.dictionary(code)
        return F.conv2d(code, self.atoms())
