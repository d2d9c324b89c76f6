"""Balanced cuts: the contiguous split of flow steps that minimises the costliest part.

In a pipeline every stage waits for the slowest one, so throughput is set by the
maximum part cost. An exact dynamic programme over the n flow steps finds the cuts in
O(P n^2); n is at most a few hundred.

The cost of a flow step comes from one of two sources:

* the FLOP model (:func:`pipeflow.tools.flops.step_flops`), the ``balanced`` scheme's default;
* a measurement on the target device (:func:`measure_step_costs`): the seconds one
  training update of that step alone takes (forward, backward and optimiser step, on the
  real batch shape). It sees what FLOPs do not: a 1x1 convolution on a 4x4 map is far
  less efficient per FLOP than one on 16x16, the optimiser's cost grows with parameters,
  not pixels. ``pipeflow bench --measure-costs`` balances on it.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from pipeflow.errors import UserError


def balanced_cuts(step_costs: Sequence[float], parts: int, boundary_costs: Sequence[float] = ()) -> list[int]:
    """Return the ``parts - 1`` cut points (numbers of steps before each) minimising the max part cost.

    ``boundary_costs[i]`` (i = 0..n, optional) is what a part ending after i steps costs on top of its steps
    when it is not the last: its boundary prior, which a ``flow`` head makes as costly as a flow step or two.
    """
    n = len(step_costs)
    if not n:
        raise UserError("the balanced scheme needs the cost of every flow step")
    if not 1 <= parts <= n:
        raise UserError(f"cannot balance {n} flow steps into {parts} parts")
    prefix = [0.0]
    for c in step_costs:
        prefix.append(prefix[-1] + float(c))
    if boundary_costs and len(boundary_costs) != n + 1:
        raise UserError(f"boundary costs are one per cut point 0..{n}, got {len(boundary_costs)}")
    ends = [float(c) for c in boundary_costs] or [0.0] * (n + 1)
    ends[n] = 0.0  # the last part ends with the model's own prior, not a boundary prior
    inf = float("inf")
    # best[p][i]: the smallest possible max cost of cutting the first i steps into p parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j] + ends[i])
                if cost < best[p][i]:
                    best[p][i], choice[p][i] = cost, j
    cuts, i = [], n
    for p in range(parts, 0, -1):
        i = choice[p][i]
        cuts.append(i)
    return sorted(cuts)[1:]


def part_costs(step_costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """Sum of the step costs of each part for cut points ``cuts`` (numbers of steps before each cut)."""
    bounds = [0, *cuts, len(step_costs)]
    return [float(sum(step_costs[a:b])) for a, b in zip(bounds, bounds[1:])]


def fastest_seconds(fns: Sequence[Callable[[], None]], repeats: int, warmup: int,
                    sync: Callable[[], None]) -> list[float]:
    """The fastest of ``repeats`` timed calls of each function.

    The calls are made in rounds (every function once per round), so that a burst of other
    work on the machine spoils one sample of many functions rather than every sample of one;
    the minimum is the sample least disturbed.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def measure_step_costs(model, x: torch.Tensor, repeats: int = 5, warmup: int = 1,
                       optimizer: str = "adam") -> tuple[list[float], list[float]]:
    """Seconds per flow step on ``x``'s device and batch: ``(train, forward)``.

    ``train`` is one update of the step alone (with the squeeze or split that a part holding
    it would hold, see :func:`pipeflow.tools.flops.step_layer_groups`): forward, backward of a
    likelihood-like loss that reaches every parameter, and an optimiser step at learning
    rate 0 (the same work, the weights unchanged). ``forward`` is the same step under
    ``no_grad``, what a part that only feeds a later one costs in the ``alternate`` schedule.
    The model's ActNorms should be initialised already (``model.initialize``).
    """
    from pipeflow.tools.flops import step_layer_groups  # noqa: PLC0415
    from pipeflow.glow.model import flow_forward  # noqa: PLC0415
    from pipeflow.part_trainer import make_optimizer  # noqa: PLC0415

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    inputs = []
    with torch.no_grad():
        h = x
        for layer in model.layers:
            inputs.append(h)
            h = flow_forward([layer], h)[0]
    train_fns, forward_fns = [], []
    for group in step_layer_groups(model):
        layers = [model.layers[i] for i in group]
        h_in = inputs[group[0]]
        params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        opt = make_optimizer(params, optimizer, 0.0)

        def train_once(layers=layers, h_in=h_in, opt=opt):
            opt.zero_grad(set_to_none=True)
            h, _, logdet, logp = flow_forward(layers, h_in)
            loss = 0.5 * h.pow(2).flatten(1).sum(1).mean() - (logdet + logp).mean()
            loss.backward()
            opt.step()

        def forward_once(layers=layers, h_in=h_in):
            with torch.no_grad():
                flow_forward(layers, h_in)

        train_fns.append(train_once)
        forward_fns.append(forward_once)
    return fastest_seconds(train_fns, repeats, warmup, sync), fastest_seconds(forward_fns, repeats, warmup, sync)
