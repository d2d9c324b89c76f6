"""Affine and additive coupling layers (Glow, section 3.3; RealNVP).

The input splits along channels into ``x_a`` (kept) and ``x_b`` (transformed):

    (shift, s) = NN(x_a)
    affine:    y_b = (x_b + shift) * sigmoid(s + 2)     log|det| = sum log sigmoid(s + 2)
    additive:  y_b =  x_b + shift                        log|det| = 0

``sigmoid(s + 2)`` keeps the scale in (0, 1) and starts it near 0.88, which is what makes
deep Glows train stably (the form used in the public Glow code). The network's last
convolution is zero-initialised, so every coupling starts as the identity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeflow.glow.actnorm import ActNorm


class ZeroConv2d(nn.Module):
    """A 3x3 convolution initialised to output zeros, with a learned per-channel log-scale (x3)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(3.0 * self.log_scale)


class CouplingNet(nn.Module):
    """conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> ZeroConv3x3.

    The ActNorms here normalise activations; they are not part of the flow, so their
    log-dets are discarded.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.out = ZeroConv2d(hidden, out_channels)
        nn.init.normal_(self.conv1.weight, std=0.05)
        nn.init.normal_(self.conv2.weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        return self.out(h)


class AffineCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.split = channels // 2
        self.net = CouplingNet(self.split, 2 * (channels - self.split), hidden)

    def _shift_and_gate(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shift, and the gate whose sigmoid is the scale."""
        shift, s = self.net(x_a).chunk(2, dim=1)
        return shift, s + 2.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, gate = self._shift_and_gate(x_a)
        y_b = (x_b + shift) * torch.sigmoid(gate)
        # log(sigmoid(gate)) would be -inf, and its gradient not finite, once sigmoid underflows (gate below
        # about -88 in float32); logsigmoid stays finite there, about gate, with a gradient near 1
        return torch.cat([x_a, y_b], dim=1), F.logsigmoid(gate).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, gate = self._shift_and_gate(y_a)
        return torch.cat([y_a, y_b / torch.sigmoid(gate) - shift], dim=1)


class AdditiveCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.split = channels // 2
        self.net = CouplingNet(self.split, channels - self.split, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        return torch.cat([x_a, x_b + self.net(x_a)], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        return torch.cat([y_a, y_b - self.net(y_a)], dim=1)
