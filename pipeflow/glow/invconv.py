"""Invertible 1x1 convolution: a learned channel permutation (Glow, section 3.2).

    y = W x  at every pixel,    log|det| = H * W * log|det W|

``InvConv1x1LU`` keeps W = P L (U + diag(sign(s) * exp(log|s|))) with P a fixed
permutation, L unit lower-triangular and U strictly upper-triangular. Its log-det is then
``H * W * sum(log|s|)``, exact and cheap, and W cannot become singular by drifting
through zero. ``InvConv1x1`` is the plain parameterisation; its log-det is computed in
float64 because ``slogdet`` in float32 loses digits for larger matrices.
Both start from a random rotation, so the initial log-det is zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SingularWeightError(ArithmeticError):
    """A 1x1 convolution is no longer invertible; the message names the layer."""


def _random_rotation(channels: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels))
    return q


class InvConv1x1(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(channels))
        self.name = ""  # where it sits in a model (set by Glow), so that errors can name it

    def check_invertible(self, name: str = "") -> None:
        """Raise :class:`SingularWeightError` naming this layer if W is (numerically) singular."""
        sign, logabsdet = torch.linalg.slogdet(self.weight.detach().double())
        if sign == 0 or not torch.isfinite(logabsdet):
            raise SingularWeightError(f"1x1 convolution {name or self.name or '(unnamed)'} has a singular weight")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, self.weight[:, :, None, None])
        logabsdet = torch.linalg.slogdet(self.weight.double()).logabsdet.to(x.dtype)
        logdet = x.shape[2] * x.shape[3] * logabsdet
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self.check_invertible()
        w_inv = torch.linalg.inv(self.weight.double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


class InvConv1x1LU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        p, lower, upper = torch.linalg.lu(_random_rotation(channels))
        s = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))
        self.name = ""  # where it sits in a model (set by Glow), so that errors can name it

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def check_invertible(self, name: str = "") -> None:
        """Raise :class:`SingularWeightError` naming this layer if a diagonal entry of U left (0, inf)."""
        if not torch.isfinite(self.log_s.detach()).all():
            raise SingularWeightError(f"1x1 convolution {name or self.name or '(unnamed)'} has a singular weight "
                                      "(log|s| not finite)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self.check_invertible()
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])
