"""The truncated objective of training by parts, and bits per dimension.

Part k maps h_{k-1} to h_k and minimises

    L_k = -log p_k(h_k) - log|det dh_k/dh_{k-1}| - sum_{splits in k} log p(z | h_kept)

with p_k the part's *boundary prior* (N(0, I) in the paper; the config's default here is a
small flow head, see :mod:`pipeflow.priors`; the real top prior for the last part). The
log-dets of the parts before k are constants for part k, so they are dropped, and its input
arrives detached: no gradient crosses a part boundary.

Those dropped terms are still useful: carried forward as one per-sample number, they
give every part the exact log-likelihood of the *prefix flow* f_k o ... o f_1 with prior
p_k, a valid (shallower) flow. For the last part this is the full model's likelihood:

    log p(x) = sum_k [log|det J_k| + log p(z factored by k)] + log p_top(h_P)

Discrete data with ``n_bins`` levels per dimension is dequantised to a continuous
density with volume (1/n_bins)^D per bin, so

    bits/dim = (-log p(x) + D log n_bins) / (D ln 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LN2 = math.log(2.0)


def bits_per_dim(log_p: torch.Tensor, num_dims: int, n_bins: int) -> torch.Tensor:
    """Bits/dim of discrete data from the continuous log-density (nats) of its dequantised form."""
    return (-log_p + num_dims * math.log(n_bins)) / (num_dims * LN2)


@dataclass
class PartOutput:
    h: torch.Tensor  # the part's output latent (still attached to the part's graph)
    loss: torch.Tensor | None  # truncated objective in bits/dim (constants dropped), scalar
    carry: torch.Tensor  # per-sample sum of log-dets and factored log-probs of parts 1..k, detached
    prefix_bpd: torch.Tensor | None  # per-sample bits/dim of the prefix flow with this part's prior, detached


class PartLikelihood(nn.Module):
    """A part and the prior on its output, as one module whose ``forward`` yields every term.

    Keeping the prior inside ``forward`` lets a data-parallel wrapper (DDP) see all the
    parameters that the objective uses.
    """

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(h_out, log|det| + log p(factored z), log p_prior(h_out))``, per sample."""
        h_out, own_terms = self.own_terms(h)
        return h_out, own_terms, self.part.prior.log_prob(h_out)

    def own_terms(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_out, log|det| + log p(factored z))``: every term but the prior on h_out (which fine-tuning the
        glued flow has only for its last part)."""
        h_out, logdet, logp_factored = self.part(h)
        return h_out, logdet + logp_factored


def part_objective(likelihood: nn.Module, h_in: torch.Tensor, carry: torch.Tensor, num_dims: int,
                   n_bins: int) -> PartOutput:
    """Run one part (a :class:`PartLikelihood`, maybe wrapped) on a detached input; compute its truncated objective."""
    h, own_terms, log_prior = likelihood(h_in.detach())
    loss = -(own_terms + log_prior).mean() / (num_dims * LN2)
    prefix_log_p = carry + (own_terms + log_prior).detach()
    return PartOutput(
        h=h,
        loss=loss,
        carry=carry + own_terms.detach(),
        prefix_bpd=bits_per_dim(prefix_log_p, num_dims, n_bins),
    )


def hand_on(likelihood: PartLikelihood, h_in: torch.Tensor, carry: torch.Tensor) -> PartOutput:
    """What a part hands the next one (its output and the carried terms), without its own prior: only its
    loss and prefix bits/dim need that, and with the `flow` head it costs two flow steps."""
    h, own_terms = likelihood.own_terms(h_in.detach())
    return PartOutput(h=h, loss=None, carry=carry + own_terms.detach(), prefix_bpd=None)
