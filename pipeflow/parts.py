"""Cutting a Glow into contiguous parts.

A cut is given as a number of flow steps before it; the model turns that into an index of
its flat layer list (:meth:`Glow.cut_index`). Schemes choose the cuts:

* ``blocks``  -- at level boundaries: level 1 | level 2 | ... | the remaining levels.
* ``across``  -- the paper's, inside levels: cuts after 1/2, 3/2, 5/2, ... levels, so
  2 parts are 1/2 | 1/2, 2, 3 and 3 parts are 1/2 | 1/2, 2/2 | 2/2, 3.
* ``cuts``    -- explicit numbers of flow steps before each cut.
* ``balanced``-- the cuts that minimise the costliest part (see :mod:`pipeflow.tools.balance`).

Parts *share* their layers with the model, so after training by parts the model is
already the glued flow, ready for end-to-end fine-tuning.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeflow.config import SCHEMES
from pipeflow.errors import UserError
from pipeflow.glow.model import Glow, flow_forward
from pipeflow.priors import boundary_prior as make_boundary_prior



class Part(nn.Module):
    """A contiguous slice of a Glow's layers plus the prior on its output."""

    def __init__(self, index: int, layers: Sequence[nn.Module], prior: nn.Module, in_shape, out_shape, steps: range):
        super().__init__()
        self.index = index
        self.layers = nn.ModuleList(layers)
        self.prior = prior
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.steps = steps  # which flow steps of the model (0-based) this part holds

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(h_out, logdet, logp_factored)``, each of the last two per sample."""
        h, _, logdet, logp_factored = flow_forward(self.layers, h)
        return h, logdet, logp_factored

    def extra_repr(self) -> str:
        steps = f"{self.steps.start}..{self.steps.stop - 1}"
        return f"index={self.index}, steps={steps}, {self.in_shape} -> {self.out_shape}"


def cut_points(model: Glow, scheme: str, parts: int, cuts: Sequence[int] = (),
               step_costs: Sequence[float] = (), boundary_costs: Sequence[float] = ()) -> list[int]:
    """Numbers of flow steps before each of the ``parts - 1`` cuts (``balanced``: see its ``boundary_costs``)."""
    n, K, L = model.num_steps, model.steps, model.levels
    if parts < 1:
        raise UserError(f"parts.count must be at least 1, got {parts}")
    if parts > n:
        raise UserError(f"cannot cut {n} flow steps into {parts} parts")
    if scheme == "blocks":
        if parts > L:
            raise UserError(f"scheme 'blocks' gives at most {L} parts for {L} levels, asked for {parts}")
        points = [k * K for k in range(1, parts)]
    elif scheme == "across":
        if parts > L + 1:
            raise UserError(f"scheme 'across' gives at most {L + 1} parts for {L} levels, asked for {parts}")
        if K < 2:
            raise UserError("scheme 'across' cuts inside a level and needs at least 2 steps per level")
        points = [(k - 1) * K + K // 2 for k in range(1, parts)]
    elif scheme == "cuts":
        points = sorted(int(c) for c in cuts)
        if len(points) != parts - 1:
            raise UserError(f"scheme 'cuts' needs parts.count - 1 = {parts - 1} cut points, got {len(points)}")
        if len(set(points)) != len(points) or any(not 0 < c < n for c in points):
            raise UserError(f"cut points must be distinct numbers of flow steps in 1..{n - 1}, got {list(cuts)}")
    elif scheme == "balanced":
        from pipeflow.tools.balance import balanced_cuts  # noqa: PLC0415 (only this scheme needs costs)

        points = balanced_cuts(step_costs, parts, boundary_costs)
    else:
        raise UserError(f"unknown split scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return points


def split_into_parts(
    model: Glow,
    scheme: str = "across",
    parts: int = 2,
    cuts: Sequence[int] = (),
    boundary_prior: str = "standard",
    step_costs: Sequence[float] = (),
    boundary_costs: Sequence[float] = (),
) -> list[Part]:
    """Cut ``model`` into ``parts`` contiguous parts; the last one ends with the model's top prior.

    Every other part ends with a new ``boundary_prior`` (see :mod:`pipeflow.priors`), built in
    flow order right after the model, so that every process builds the same one.
    """
    if parts == 1:
        points = []
    else:
        points = cut_points(model, scheme, parts, cuts, step_costs, boundary_costs)
    bounds = [0, *points, model.num_steps]
    result = []
    for k in range(len(bounds) - 1):
        start, stop = model.cut_index(bounds[k]), model.cut_index(bounds[k + 1])
        in_shape = model.layer_shapes[start][0]
        out_shape = model.layer_shapes[stop - 1][1]
        last = k == len(bounds) - 2
        prior = model.top_prior if last else make_boundary_prior(boundary_prior, out_shape)
        result.append(Part(k, model.layers[start:stop], prior, in_shape, out_shape, range(bounds[k], bounds[k + 1])))
    return result


def whole_model_part(model: Glow) -> Part:
    """The whole flow as a single part: its truncated objective is the end-to-end objective."""
    return split_into_parts(model, parts=1)[0]
