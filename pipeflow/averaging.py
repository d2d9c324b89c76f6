"""Averaged weights for evaluation: an exponential moving average (EMA) of a model's parameters.

openai/glow evaluates its flows on Polyak-averaged weights: one epoch's test bits/dim on the
raw weights swings with the last few updates, while the average moves slowly, so two runs
are told apart by their training rather than by where their last step happened to land.
With ``train.eval_ema = d`` (0 < d < 1) every evaluation also runs on

    average <- e * average + (1 - e) * weights      after training step n,  e = min(d, (1 + n) / (10 + n))

and its records carry ``test_bpd_ema`` beside ``test_bpd``. The warm-up of ``e`` (as
TensorFlow's ExponentialMovingAverage does with ``num_updates``) keeps the first, poor weights
from weighing on the average for thousands of steps: with d = 0.999 and no warm-up, a 7,200-step
MNIST run still lagged 0.05 bpd behind its raw weights at the end. The average starts from the
weights after the first step (so that ActNorm's data-dependent start is in it) and travels in
every checkpoint, so that a resumed run evaluates the same average as an uninterrupted one (under
the same decay: a run resumed with another ``train.eval_ema`` continues the saved average with it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def fold(average: list[torch.Tensor], current: list[torch.Tensor], decay: float, n: int) -> None:
    """One EMA step in place: ``average <- e * average + (1 - e) * current``, ``e = min(decay, (1 + n) / (10 + n))``.

    The ramp (as TensorFlow's ExponentialMovingAverage has with ``num_updates``) keeps the first,
    poor weights from weighing on the average for thousands of steps. Shared by the evaluated
    average (here) and the averaged feed of :mod:`pipeflow.feed`.
    """
    torch._foreach_lerp_(average, current, 1.0 - min(decay, (1 + n) / (10 + n)))


class WeightAverage:
    """An EMA of every parameter of ``module``, and a way to evaluate with it in their place."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay {decay} must be in [0, 1)")
        self.params = [p for p in module.parameters() if p.dtype.is_floating_point]
        self.decay = decay
        self.shadow: list[torch.Tensor] | None = None  # made at the first update
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (the first call copies them)."""
        current = [p.detach() for p in self.params]
        self.updates += 1
        if self.shadow is None:
            self.shadow = [p.clone() for p in current]
        else:
            fold(self.shadow, current, self.decay, self.updates)

    def state_dict(self) -> dict:
        """The average and its count of updates (its warm-up depends on the count), for a checkpoint."""
        return {"updates": self.updates, "shadow": self.shadow}  # saved at once: no copy needed

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if shadow is not None and [s.shape for s in shadow] != [p.shape for p in self.params]:
            raise ValueError("the averaged weights do not match the model's parameters")
        self.updates = int(state["updates"])
        self.shadow = None if shadow is None else [torch.empty_like(p).copy_(s) for s, p in zip(shadow, self.params)]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the module holds the averaged weights; on leaving, its own again."""
        if self.shadow is None:  # no step yet: the average is the weights themselves
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def weight_average(module: nn.Module, decay: float) -> WeightAverage | None:
    """The average ``train.eval_ema`` asks for, or None when it is 0 (off)."""
    return WeightAverage(module, decay) if decay else None
