"""Boundary priors: the density a part (but the last) puts on its output h_k.

Training by parts asks part k to make ``p_k(h_k)`` large. With N(0, I) that means turning the
data into white noise after a few steps, which a shallow part cannot do where the data has a
fixed background (MNIST: most pixels are always 0). End to end, the top prior and the split
priors absorb that background; these boundary priors give a part the same means:

* ``standard``    -- N(0, I).
* ``learned``     -- a Gaussian with a learned mean and scale per channel.
* ``position``    -- a Gaussian with a learned mean and scale per channel *and position*
  (Glow's top prior).
* ``conditional`` -- Glow's split prior at the boundary: the first half of the channels get a
  per-position Gaussian, the second half a Gaussian whose mean and scale a zero-initialised
  convolution predicts from the first half.
* ``flow``        -- an auxiliary head: a few cheap flow steps and a per-position Gaussian, as
  decoupled greedy learning trains each module against an auxiliary head.

Each is a normalised density on h_k, so the prefix bits/dim stay exact and the composition
identity holds. All but ``flow`` start as N(0, I). A boundary prior belongs to its
:class:`~pipeflow.parts.Part`, not to the model's layers: the part's optimiser trains it, the
part's state dict saves it, and the glued flow (``model.pt``, fine-tuning) never sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeflow.config import BOUNDARY_PRIORS
from pipeflow.errors import UserError
from pipeflow.glow.coupling import ZeroConv2d
from pipeflow.glow.gaussian import LearnedGaussian, StandardNormal, gaussian_log_prob
from pipeflow.glow.model import FlowStep

FLOW_PRIOR_STEPS = 2  # flow steps of the auxiliary head
FLOW_PRIOR_HIDDEN = 16  # channels of its coupling networks: cheap next to the part itself


class ConditionalGaussian(nn.Module):
    """p(h) = N(h_a; per-position mean, scale) * N(h_b; m(h_a), s(h_a)), with (m, log s) = ZeroConv(h_a)."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        c, height, width = shape
        if c < 2:
            raise UserError(f"the 'conditional' boundary prior needs at least 2 channels at the cut, got {c}")
        self.keep = c // 2
        self.first = LearnedGaussian((self.keep, height, width))
        self.predict = ZeroConv2d(self.keep, 2 * (c - self.keep))

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        h_a, h_b = h[:, : self.keep], h[:, self.keep :]
        mean, log_std = self.predict(h_a).chunk(2, dim=1)
        return self.first.log_prob(h_a) + gaussian_log_prob(h_b, mean, log_std)

    def sample(self, shape: tuple[int, ...], temperature: float = 1.0, generator=None) -> torch.Tensor:
        h_a = self.first.sample((shape[0], self.keep, *shape[2:]), temperature, generator)
        mean, log_std = self.predict(h_a).chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return torch.cat([h_a, mean + temperature * torch.exp(log_std) * eps], dim=1)


class FlowPrior(nn.Module):
    """p(h) = N(g(h); per-position Gaussian) |det dg/dh|, with g a few small flow steps."""

    def __init__(self, shape: tuple[int, int, int], steps: int = FLOW_PRIOR_STEPS, hidden: int = FLOW_PRIOR_HIDDEN):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(shape[0], hidden) for _ in range(steps))
        self.base = LearnedGaussian(tuple(shape))

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        logdet = h.new_zeros(h.shape[0])
        for step in self.steps:
            h, ld = step(h)
            logdet = logdet + ld
        return self.base.log_prob(h) + logdet

    @torch.no_grad()
    def sample(self, shape: tuple[int, ...], temperature: float = 1.0, generator=None) -> torch.Tensor:
        h = self.base.sample(shape, temperature, generator)
        for step in reversed(self.steps):
            h = step.inverse(h)
        return h


def boundary_prior(name: str, shape: tuple[int, int, int]) -> nn.Module:
    """The boundary prior ``name`` on a part output of ``shape`` (C, H, W)."""
    c = shape[0]
    if name == "standard":
        return StandardNormal()
    if name == "learned":
        return LearnedGaussian((c, 1, 1))
    if name == "position":
        return LearnedGaussian(tuple(shape))
    if name == "conditional":
        return ConditionalGaussian(tuple(shape))
    if name == "flow":
        return FlowPrior(tuple(shape))
    raise UserError(f"unknown boundary prior {name!r}; choose one of {', '.join(BOUNDARY_PRIORS)}")
