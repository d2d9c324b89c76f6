"""Split: factor half of the channels out of the flow (Glow's multi-scale architecture).

    h -> (h_kept, z),   z ~ N(mean(h_kept), exp(log_std(h_kept))^2)

The conditional prior's mean and log-std come from a zero-initialised convolution of the
kept half, so it starts as N(0, I). The split itself is a permutation (log|det| = 0);
what it contributes to the likelihood is ``log p(z | h_kept)``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeflow.glow.coupling import ZeroConv2d
from pipeflow.glow.gaussian import gaussian_log_prob


class Split(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.prior = ZeroConv2d(self.keep, 2 * (channels - self.keep))

    def _prior_params(self, h_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.prior(h_kept).chunk(2, dim=1)
        return mean, log_std

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(h_kept, z, log p(z | h_kept))``."""
        h_kept, z = h[:, : self.keep], h[:, self.keep :]
        mean, log_std = self._prior_params(h_kept)
        return h_kept, z, gaussian_log_prob(z, mean, log_std)

    def inverse(self, h_kept: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([h_kept, z], dim=1)

    def sample(self, h_kept: torch.Tensor, temperature: float = 1.0, generator=None) -> torch.Tensor:
        """Draw z from the conditional prior (scaled by ``temperature``) and undo the split."""
        mean, log_std = self._prior_params(h_kept)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return self.inverse(h_kept, mean + temperature * torch.exp(log_std) * eps)
