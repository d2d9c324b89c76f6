"""Gaussian densities used as priors: the top prior, the split priors, the boundary priors."""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(x; mean, exp(log_std)^2), summed over every dimension but the first."""
    log_p = -0.5 * (LOG_2PI + 2.0 * log_std + (x - mean) ** 2 * torch.exp(-2.0 * log_std))
    return log_p.flatten(1).sum(1)


class StandardNormal(nn.Module):
    """N(0, I): the truncated objective's default prior on a part's output."""

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        return -0.5 * (LOG_2PI + h**2).flatten(1).sum(1)

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0, generator=None) -> torch.Tensor:
        return temperature * torch.randn(shape, generator=generator)


class LearnedGaussian(nn.Module):
    """A diagonal Gaussian with learned mean and log-std, zero-initialised (so it starts as N(0, I)).

    ``shape`` is the shape of one sample that the parameters cover and broadcast over:
    ``(C, H, W)`` for Glow's learned top prior, ``(C, 1, 1)`` for a per-channel boundary prior.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, *shape))
        self.log_std = nn.Parameter(torch.zeros(1, *shape))

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(h, self.mean, self.log_std)

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0, generator=None) -> torch.Tensor:
        eps = torch.randn(shape, generator=generator).to(self.mean.device)
        return self.mean + temperature * torch.exp(self.log_std) * eps
