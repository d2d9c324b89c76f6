"""A FLOP model of Glow, for planning cuts and predicting the speed of each schedule.

Counts multiply-adds x 2 of the convolutions (everything else is a few FLOPs per element
and is counted as such). A training step costs about 3x the forward pass (forward plus a
backward twice as costly); a part that only feeds a later one runs forward under no_grad.

In the ``alternate`` schedule a step trains one part k, runs parts 1..k-1 forward under
no_grad and skips the parts after k, so its cost relative to end-to-end is

    mean_k [ sum_{j<k} F_j + 3 F_k ] / (3 F)

which for the paper's CIFAR-10 Glow gives 0.56 (2 parts across blocks) and 0.46 (3 parts).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeflow.glow.coupling import AffineCoupling
from pipeflow.glow.model import FlowStep, Glow
from pipeflow.glow.split import Split
from pipeflow.priors import boundary_prior

BACKWARD_FACTOR = 2.0  # backward costs about twice the forward pass


def _conv(c_in: int, c_out: int, k: int, pixels: int) -> float:
    return 2.0 * c_in * c_out * k * k * pixels


def layer_flops(layer: nn.Module, in_shape: tuple[int, int, int]) -> float:
    """Forward FLOPs per image of one layer of the flat Glow."""
    c, h, w = in_shape
    pixels = h * w
    if isinstance(layer, FlowStep):
        coupling = layer.coupling
        hidden = coupling.net.conv2.weight.shape[0]
        c_a = coupling.split
        c_out = coupling.net.out.conv.weight.shape[0]
        net = _conv(c_a, hidden, 3, pixels) + _conv(hidden, hidden, 1, pixels) + _conv(hidden, c_out, 3, pixels)
        net += 8.0 * hidden * pixels  # two ActNorms and two ReLUs inside the coupling network
        elementwise = (4.0 if isinstance(coupling, AffineCoupling) else 1.0) * c * pixels + 2.0 * c * pixels
        return _conv(c, c, 1, pixels) + net + elementwise
    if isinstance(layer, Split):
        keep = layer.keep
        return _conv(keep, 2 * (c - keep), 3, pixels) + 4.0 * (c - keep) * pixels
    return 0.0  # squeeze: a reshape


def model_layer_flops(model: Glow) -> list[float]:
    return [layer_flops(layer, shapes[0]) for layer, shapes in zip(model.layers, model.layer_shapes)]


def step_flops(model: Glow) -> list[float]:
    """Forward FLOPs per image of each flow step, with squeezes and splits charged to their neighbour step."""
    costs: list[float] = []
    for layer, flops in zip(model.layers, model_layer_flops(model)):
        if isinstance(layer, FlowStep):
            costs.append(flops)
        elif costs:
            costs[-1] += flops
    return costs


def prior_flops(prior: nn.Module, shape: tuple[int, int, int]) -> float:
    """Forward FLOPs per image of a boundary prior on ``shape``: the convolutions of the ``flow`` head's steps
    and of the ``conditional`` prior's prediction (a Gaussian's own few per element are not counted)."""
    _, h, w = shape
    steps = [m for m in prior.modules() if isinstance(m, FlowStep)]
    predict = getattr(prior, "predict", None)
    conv = _conv(predict.conv.in_channels, predict.conv.out_channels, 3, h * w) if predict is not None else 0.0
    return sum(layer_flops(step, shape) for step in steps) + conv


def boundary_prior_flops(model: Glow, kind: str) -> list[float]:
    """Forward FLOPs per image of a ``kind`` boundary prior at each cut point 0..num_steps (0 at both ends),
    for balancing parts with their priors. The priors are built only to be counted, under a forked random
    state, so the weights the run then builds are the ones it would build without this."""
    shapes = [model.layer_shapes[model.cut_index(i) - 1][1] for i in range(1, model.num_steps)]
    flops: dict[tuple[int, int, int], float] = {}
    with torch.random.fork_rng(devices=[]):
        for shape in shapes:
            if shape not in flops:
                flops[shape] = prior_flops(boundary_prior(kind, shape), shape)
    return [0.0, *(flops[shape] for shape in shapes), 0.0]


def part_flops(model: Glow, parts: Sequence[nn.Module], with_priors: bool = True) -> list[float]:
    """Forward FLOPs per image of each part, by default with its boundary prior (what training by parts runs;
    fine-tuning the glued flow runs the parts' layers only)."""
    per_step = step_flops(model)
    return [sum(per_step[i] for i in part.steps) + (prior_flops(part.prior, part.out_shape) if with_priors else 0.0)
            for part in parts]


def part_step_costs(trained: Sequence[float], handed_on: Sequence[float] | None = None) -> list[float]:
    """Each part's training step (the parts before it forward only), relative to an end-to-end step.

    ``trained``: each part's forward FLOPs with its boundary prior (what its own step runs);
    ``handed_on``: without it (what a part that only feeds a later one runs; end to end runs these
    and the last part's prior, the model's top). By default the two are the same.
    """
    handed_on = trained if handed_on is None else handed_on
    whole = (1 + BACKWARD_FACTOR) * (sum(handed_on[:-1]) + trained[-1])
    return [(sum(handed_on[:k]) + (1 + BACKWARD_FACTOR) * f) / whole for k, f in enumerate(trained)]


def alternate_cost_ratio(trained: Sequence[float], handed_on: Sequence[float] | None = None) -> float:
    """Cost of an average ``alternate`` step relative to an end-to-end step (see :func:`part_step_costs`)."""
    costs = part_step_costs(trained, handed_on)
    return sum(costs) / len(costs)


def stage_cost_ratio(part_costs: Sequence[float]) -> float:
    """P ranks, one part each, in a pipeline: a step takes as long as the costliest part.

    Relative to an end-to-end step on one device; transfers overlap compute and are not counted.
    """
    total = sum(part_costs)
    return max(part_costs) / total if total else 1.0


def data_parallel_cost_ratio(ranks: int) -> float:
    """P ranks, each a 1/P shard of the batch through the whole model (gradient all-reduce not counted)."""
    return 1.0 / max(ranks, 1)


def step_layer_groups(model: Glow) -> list[list[int]]:
    """Indices into ``model.layers`` of what each flow step brings into a part.

    The same grouping as the cuts (:meth:`Glow.cut_index`): a squeeze goes with the step
    after it (it opens a level), a split with the step before it (it closes one), so the
    layers of a part are exactly the union of its steps' groups.
    """
    groups: list[list[int]] = []
    pending: list[int] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, FlowStep):
            groups.append([*pending, i])
            pending = []
        elif isinstance(layer, Split):
            groups[-1].append(i)
        else:
            pending.append(i)
    if pending:
        groups[-1].extend(pending)
    return groups


def paper_plan_ratio(step_ratio: float, by_parts_epochs: int, finetune_epochs: int) -> float:
    """Wall time of (E1 by-parts + E2 end-to-end epochs) over (E1 + E2) end-to-end epochs."""
    total = by_parts_epochs + finetune_epochs
    return (by_parts_epochs * step_ratio + finetune_epochs) / total if total else 1.0
