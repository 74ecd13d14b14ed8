"""Pieces shared by the two latent-search baselines of Table 1, AnoGAN and f-AnoGAN.

- :class:`Generator`: the DCGAN generator ``G: z -> image`` (Radford et al. 2016), a linear
  projection of ``z`` to the shared latent map shape followed by the shared
  :class:`~sparsegan.models.networks.Decoder` (the image path of Sparse-GAN's ``G_de``).
- :func:`gradient_penalty`: the WGAN-GP penalty (Gulrajani et al. 2017, eq. 3) of f-AnoGAN.
- :func:`frozen`: modules in eval mode with ``requires_grad=False`` for a while, then restored
  (AnoGAN's z-search and f-AnoGAN's encoder training keep G and D fixed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .networks import Decoder, _init_weights, latent_shape


class Generator(nn.Module):
    """DCGAN generator G: (B, latent_dim) z ~ N(0, I) -> (B, 1, S, S) image in [-1, 1].

    ``z -> Linear -> (B, C, h, w) -> BN -> ReLU -> Decoder`` (``norm="none"``: no BN, biases
    instead, as ``model.norm``), with (C, h, w) the shared latent
    shape (:func:`~sparsegan.models.networks.latent_shape`, e.g. 64x8x8 at S=64, b=16). The linear
    projection is DCGAN's first transposed convolution from a 1x1 map, written as a matrix.
    """

    def __init__(self, image_size: int, base_channels: int, latent_dim: int,
                 norm: str = "batch"):
        super().__init__()
        self.latent_dim = latent_dim
        self.shape = latent_shape(image_size, base_channels)
        c, h, w = self.shape
        self.project = nn.Linear(latent_dim, c * h * w, bias=norm != "batch")
        self.bn = nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()
        _init_weights(self.project)
        _init_weights(self.bn)
        self.decoder = Decoder(image_size, base_channels, norm=norm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        latent = self.project(z).view(z.shape[0], *self.shape)  # (B, C, h, w)
        return self.decoder(torch.relu(self.bn(latent)))

    def sample_z(self, n: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, latent_dim) draws of the prior N(0, I)."""
        return torch.randn(n, self.latent_dim, device=device, generator=generator)


def _critic_value(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The (B,) critic value of a critic returning either a tensor or (value, features)."""
    return out[0] if isinstance(out, tuple) else out


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
                     real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``GP = mean_i (||grad D(x_hat_i)||_2 - 1)^2`` (Gulrajani et al. 2017, eq. 3).

    ``x_hat = alpha * real + (1 - alpha) * fake`` with ``alpha`` (B, 1, ..., 1) ~ U(0, 1) per sample
    unless given. The graph is kept (``create_graph=True``) so that GP trains the critic. The critic
    must be per-sample (no batch norm), so that the gradient of ``sum_i D(x_hat_i)`` with respect to
    ``x_hat_i`` is that of ``D(x_hat_i)`` alone. Returns a scalar.
    """
    if alpha is None:
        alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device,
                           dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    value = _critic_value(critic(x_hat))
    (grad,) = torch.autograd.grad(value.sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).pow(2).sum(dim=1).add(1e-12).sqrt()  # eps: finite gradient at 0
    return (norm - 1).pow(2).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """``requires_grad=False`` for every parameter of ``modules`` and (if ``eval_mode``) eval mode;
    both restored after. Gradients still flow *through* the modules to their inputs."""
    modes = [[m.training for m in module.modules()] for module in modules]
    flags = [[p.requires_grad for p in module.parameters()] for module in modules]
    try:
        for module in modules:
            if eval_mode:
                module.eval()
            module.requires_grad_(False)
        yield
    finally:
        for module, mode, flag in zip(modules, modes, flags):
            for m, training in zip(module.modules(), mode):
                m.training = training
            for p, requires_grad in zip(module.parameters(), flag):
                p.requires_grad_(requires_grad)

