"""The plan of parts: what each part holds and what it costs, for every scheme.

Costs come from the FLOP model, or from per-step costs measured on the target device
(:func:`pipeflow.tools.balance.measure_step_costs`): with those, ``balanced`` cuts minimise
the measured slowest part and every part shows its measured share as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeflow.tools.balance import part_costs
from pipeflow.config import AUTOMATIC_SCHEMES, Config
from pipeflow.errors import UserError
from pipeflow.tools.flops import alternate_cost_ratio, part_flops, paper_plan_ratio
from pipeflow.glow import Glow
from pipeflow.build import build_parts
from pipeflow.parts import Part


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
    measured_share: float | None = None  # of the whole model's measured training cost, when measured


def cuts_of(parts: Sequence[Part]) -> list[int]:
    """Numbers of flow steps before each cut."""
    return [p.steps.start for p in parts[1:]]


def describe_parts(model: Glow, parts: list[Part], step_costs: Sequence[float] | None = None) -> list[PartPlan]:
    """One row per part; with measured ``step_costs`` (one per flow step) also each part's measured share."""
    flops = part_flops(model, parts)
    total = sum(flops)
    measured = None
    if step_costs:
        costs = part_costs(step_costs, cuts_of(parts))
        measured = [c / sum(costs) for c in costs]
    return [
        PartPlan(p.index, (p.steps.start + 1, p.steps.stop), len(p.layers), p.in_shape, p.out_shape,
                 sum(x.numel() for x in p.parameters()), f, f / total, measured[k] if measured else None)
        for k, (p, f) in enumerate(zip(parts, flops))
    ]


def scheme_parts(cfg: Config, model: Glow, scheme: str, count: int,
                 step_costs: Sequence[float] | None = None) -> list[Part]:
    """The parts of ``scheme``; ``balanced`` balances ``step_costs`` if given, else the FLOP model."""
    return build_parts(cfg, model, count, scheme, step_costs=step_costs)


def predicted_ratios(cfg: Config, model: Glow, parts: list[Part]) -> dict[str, float]:
    """FLOP-model predictions: an alternate step, and the whole paper-style plan, relative to end-to-end."""
    step = alternate_cost_ratio(part_flops(model, parts), part_flops(model, parts, with_priors=False))
    t = cfg.train
    return {"alternate_step": step, "plan": paper_plan_ratio(step, t.by_parts_epochs, t.finetune_epochs)}


def measured_alternate_ratio(train_costs: Sequence[float], forward_costs: Sequence[float],
                             cuts: Sequence[int]) -> float:
    """The alternate step's cost relative to end-to-end, from measured per-step costs.

    Like :func:`pipeflow.tools.flops.alternate_cost_ratio`, but with each part's measured training
    and no_grad forward costs instead of 3 F and F.
    """
    train, forward = part_costs(train_costs, cuts), part_costs(forward_costs, cuts)
    per_part = [sum(forward[:k]) + t for k, t in enumerate(train)]
    return sum(per_part) / len(per_part) / sum(train)


def _plan_table(cfg: Config, scheme: str, rows: list, ratios: dict[str, float]):
    from rich.table import Table  # noqa: PLC0415

    title = f"{scheme}{' (configured)' if scheme == cfg.parts.scheme else ''}: {cfg.parts.count} parts"
    table = Table(title=title)
    for col in ("part", "flow steps", "layers", "shape in", "shape out", "params", "GFLOP/img (fwd)", "share"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.index), f"{r.steps[0]}-{r.steps[1]}", str(r.layers), "x".join(map(str, r.in_shape)),
                      "x".join(map(str, r.out_shape)), f"{r.params:,}", f"{r.flops / 1e9:.3f}", f"{r.share:.1%}")
    t = cfg.train
    table.caption = (f"alternate step / e2e step = {ratios['alternate_step']:.3f};  "
                     f"{t.by_parts_epochs} by parts + {t.finetune_epochs} e2e epochs / "
                     f"{t.run_epochs} e2e epochs = {ratios['plan']:.3f}")
    return table


def render_plan(cfg: Config, model: Glow, console) -> dict:
    """``pipeflow plan``: a table per scheme (the configured one first); returns the figures by scheme."""
    report = {}
    for scheme in [cfg.parts.scheme] + [s for s in AUTOMATIC_SCHEMES if s != cfg.parts.scheme]:
        try:
            parts = scheme_parts(cfg, model, scheme, cfg.parts.count)
        except UserError as exc:
            if scheme == cfg.parts.scheme:
                raise
            console.print(f"[dim]{scheme}: {exc}[/dim]")
            continue
        rows, ratios = describe_parts(model, parts), predicted_ratios(cfg, model, parts)
        console.print(_plan_table(cfg, scheme, rows, ratios))
        report[scheme] = {"parts": [r.__dict__ for r in rows], **ratios}
    return report
