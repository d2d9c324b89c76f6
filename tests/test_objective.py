"""Bits per dimension and the truncated objective, on hand-made numbers."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeflow.objective import bits_per_dim, part_objective


def test_uniform_density_gives_log2_n_bins():
    """A uniform density on [-1/2, 1/2]^D has log p = 0: every bin has probability 1/n_bins."""
    for n_bins, dims in [(256, 3072), (17, 64), (2, 1)]:
        bpd = bits_per_dim(torch.zeros(5, dtype=torch.float64), dims, n_bins)
        torch.testing.assert_close(bpd, torch.full((5,), math.log2(n_bins), dtype=torch.float64))


def test_bits_per_dim_formula():
    dims, n_bins = 10, 256
    log_p = torch.tensor([-dims * math.log(2.0), 3.0 * dims * math.log(2.0)], dtype=torch.float64)
    # one extra bit per dim costs D ln 2 nats; a density 8x higher per dim saves 3 bits per dim
    expected = torch.tensor([1.0 + 8.0, -3.0 + 8.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_p, dims, n_bins), expected)


class Fixed(nn.Module):
    """A stand-in part: ``h -> 2h``, with given per-sample own terms and prior log-probs."""

    def __init__(self, own: list[float], prior: list[float]):
        super().__init__()
        self.own = torch.tensor(own, dtype=torch.float64)
        self.prior = torch.tensor(prior, dtype=torch.float64)
        self.seen_requires_grad = None

    def forward(self, h):
        self.seen_requires_grad = h.requires_grad
        return 2 * h, self.own.clone(), self.prior.clone()


def test_part_objective_loss_carry_and_prefix():
    dims, n_bins = 4, 256
    h = torch.ones(2, dims, dtype=torch.float64, requires_grad=True)
    first, second = Fixed([1.0, 2.0], [-10.0, -20.0]), Fixed([0.5, -0.5], [-3.0, -4.0])
    out1 = part_objective(first, h, torch.zeros(2, dtype=torch.float64), dims, n_bins)
    assert first.seen_requires_grad is False  # the input arrives detached
    # the loss has no dequantisation constant and no carried terms: only this part's own terms
    torch.testing.assert_close(out1.loss, torch.tensor((9.0 + 18.0) / 2 / (dims * math.log(2)), dtype=torch.float64))
    torch.testing.assert_close(out1.carry, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out1.prefix_bpd, bits_per_dim(torch.tensor([-9.0, -18.0], dtype=torch.float64),
                                                             dims, n_bins))
    out2 = part_objective(second, out1.h, out1.carry, dims, n_bins)
    torch.testing.assert_close(out2.h, 4 * h.detach())
    torch.testing.assert_close(out2.loss, torch.tensor((2.5 + 4.5) / 2 / (dims * math.log(2)), dtype=torch.float64))
    torch.testing.assert_close(out2.carry, torch.tensor([1.5, 1.5], dtype=torch.float64))
    # the prefix log-likelihood is the carry plus this part's terms; log2(n_bins) appears once
    log_p = torch.tensor([1.0 + 0.5 - 3.0, 2.0 - 0.5 - 4.0], dtype=torch.float64)
    torch.testing.assert_close(out2.prefix_bpd, -log_p / (dims * math.log(2)) + 8.0)
    assert not out2.carry.requires_grad and not out2.prefix_bpd.requires_grad
