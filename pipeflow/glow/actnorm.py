"""ActNorm: a per-channel affine map initialised from the data (Glow, section 3.1).

    y = (x + b) * exp(s),    log|det| = H * W * sum_c s_c

On the first batch it sees, ``b`` and ``s`` are set so that ``y`` has zero mean and unit
variance per channel. Whether that has happened is stored in a *buffer*, so it travels in
``state_dict``: a model loaded from a checkpoint is never initialised a second time.
"""

from __future__ import annotations

import torch
from torch import nn


class ActNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps
        self.register_buffer("initialized", torch.tensor(False))
        # Reading the buffer on a GPU is a device-to-host sync; once it has read True it is not
        # read again (until a state_dict is loaded into this layer).
        self._known_initialized = False
        self.name = ""  # where it sits in a model (set by Glow), so that errors can name it

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent init: zero mean, unit variance per channel on this batch."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._known_initialized:
            if not bool(self.initialized):
                self.initialize(x)
            self._known_initialized = True
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias
