"""The contract every trained model implements, so that one training loop serves all.

Images enter as float tensors ``(B, 1, S, S)`` scaled to [-1, 1]. A detector trains in *phases*
(most have one; f-AnoGAN has ``gan`` then ``encoder``), one ``train_step`` per batch, and every
optimizer step of a ``train_step`` goes through :meth:`Detector.update`, the one update path:
zero_grad, backward, the gradients averaged over the ranks when training is distributed, the
NaN guard, step. So the model files are written against bare modules and know nothing of
distribution. Its scores are computed from its networks by :mod:`sparsegan.scoring`, which
training does not import.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class Diverged(FloatingPointError):
    """The loss of an optimizer's step (``loss``: the optimizer's name) is NaN or infinite on
    some rank; nothing was stepped."""

    def __init__(self, loss: str, value: float):
        super().__init__(f"the {loss} step's loss is {value}")
        self.loss, self.value = loss, value


class Detector(nn.Module):
    """Base class of all trained models. ``name``: its :mod:`sparsegan.spec` entry (scoring
    dispatches on it; :func:`sparsegan.models.build_detector` checks it)."""

    name: str = ""

    # (parameters, loss) -> the loss averaged over the ranks, the gradients averaged in place;
    # None: one process
    _average: Callable[[list[nn.Parameter], torch.Tensor], float] | None = None

    def average_gradients_with(self, average: Callable[[list[nn.Parameter], torch.Tensor], float]
                               ) -> None:
        """Train as one of several ranks: :meth:`update` calls ``average(parameters, loss)``
        between backward and step (the trainer passes
        :func:`sparsegan.distributed.average_gradients` under torchrun)."""
        self._average = average

    def update(self, optimizer: str, loss: torch.Tensor) -> float:
        """One step of ``self.optimizers()[optimizer]`` on ``loss`` (a scalar): zero_grad,
        backward, the gradients (and the loss) averaged over the ranks when distributed
        (:meth:`average_gradients_with`), then the NaN guard, then the step. Returns the loss
        (averaged over the ranks). A NaN or infinite loss on any rank raises :class:`Diverged`
        on every rank before the step, so the weights stay the last good ones."""
        opt = self.optimizers()[optimizer]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        value = (float(loss.detach()) if self._average is None
                 else self._average(params, loss.detach()))
        if not math.isfinite(value):
            raise Diverged(optimizer, value)
        opt.step()
        return value

    _training: tuple[dict, dict] | None = None  # (optimizers, schedulers), built on first use

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers ``train_step`` uses, by name (saved in checkpoints), made by
        :meth:`make_optimizers` on first use: a detector that only scores (the score and
        evaluate stages, serving) never builds them, since a torch optimizer's constructor
        imports ``torch._dynamo``, seconds of start-up in every such process."""
        if self._training is None:
            optimizers = self.make_optimizers()
            self._training = (optimizers, self.make_schedulers(optimizers))
        return self._training[0]

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """LR schedulers by name (:meth:`make_schedulers`), stepped once per epoch by the
        trainer."""
        self.optimizers()
        return self._training[1]

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Build the optimizers of :meth:`optimizers` (called once)."""
        raise NotImplementedError

    def make_schedulers(self, optimizers: dict[str, torch.optim.Optimizer]
                        ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Build the LR schedulers of ``optimizers`` (called once; none by default)."""
        return {}

    def phases(self) -> list[str]:
        """One entry per training epoch, naming the phase that epoch trains."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, phase: str) -> dict[str, float]:
        """One optimisation step on a batch of normal images; returns the losses for logging."""
        raise NotImplementedError
