"""The plan of parts: what each part holds and what it costs, for every scheme."""

from __future__ import annotations

from dataclasses import dataclass

from pipeflow.config import Config
from pipeflow.flops import alternate_cost_ratio, part_flops, paper_plan_ratio, step_flops
from pipeflow.glow import Glow
from pipeflow.parts import Part, split_into_parts


@dataclass
class PartPlan:
    index: int
    steps: tuple[int, int]  # first and last flow step (1-based, inclusive)
    layers: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    params: int
    flops: float  # forward FLOPs per image
    share: float  # of the whole model's forward FLOPs


def describe_parts(model: Glow, parts: list[Part]) -> list[PartPlan]:
    flops = part_flops(model, parts)
    total = sum(flops)
    return [
        PartPlan(p.index, (p.steps.start + 1, p.steps.stop), len(p.layers), p.in_shape, p.out_shape,
                 sum(x.numel() for x in p.parameters()), f, f / total)
        for p, f in zip(parts, flops)
    ]


def scheme_parts(cfg: Config, model: Glow, scheme: str, count: int) -> list[Part]:
    return split_into_parts(model, scheme, count, cfg.parts.cuts, cfg.parts.boundary_prior,
                            step_flops(model) if scheme == "balanced" else ())


def predicted_ratios(cfg: Config, model: Glow, parts: list[Part]) -> dict[str, float]:
    """FLOP-model predictions: an alternate step, and the whole paper-style plan, relative to end-to-end."""
    step = alternate_cost_ratio(part_flops(model, parts))
    t = cfg.train
    return {"alternate_step": step, "plan": paper_plan_ratio(step, t.by_parts_epochs, t.finetune_epochs)}
