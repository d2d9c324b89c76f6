"""Everything one pipeline stage owns: a part, its optimiser, its learning-rate schedule.

The single-device schedules and the multi-rank pipeline drive the very same object, so
both run the same objective and the same update; only who calls ``train_step`` differs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from pipeflow.config import TrainConfig
from pipeflow.glow.model import check_invertible
from pipeflow.objective import PartLikelihood, PartOutput, hand_on, part_objective


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


def optimizer_states(trainers) -> dict[nn.Parameter, dict]:
    """Each trained parameter's optimiser state, over ``trainers`` (for :meth:`PartTrainer.carry_on_from`)."""
    return {p: tr.optimizer.state[p] for tr in trainers if tr.optimizer is not None
            for p in tr.params if p in tr.optimizer.state}


def decay(schedule: str, progress: float) -> float:
    """The factor ``train.lr_schedule`` puts on every rate, ``progress`` of the run's steps done."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


class PartTrainer:
    def __init__(self, part: nn.Module, lr: float, cfg: TrainConfig, num_dims: int, n_bins: int,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, name: str = "",
                 grad_hook: Callable[[list[torch.Tensor]], None] | None = None,
                 agree: Callable[[bool], bool] | None = None):
        self.part = part
        self.likelihood = self.module = PartLikelihood(part)
        if wrap is not None:  # e.g. DistributedDataParallel for data-parallel training
            self.module = wrap(self.module)
        # train.compile: the training step's forward and objective as one graph, from its second call on
        self.compiled = torch.compile(partial(part_objective, self.module)) if cfg.compile else None
        self.ran_eagerly = False
        self.params = [p for p in part.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg.optimizer, lr) if self.params else None
        self.base_lr, self.cfg = lr, cfg
        self.num_dims, self.n_bins = num_dims, n_bins
        self.name = name or f"part {getattr(part, 'index', 0)}"
        self.grad_hook = grad_hook  # e.g. averaging gradients over the replicas of a pipeline stage
        # processes that train copies of one part (DDP, stage replicas) must skip a step together:
        # ``agree(finite)`` is True only if the step is finite on every one of them
        self.agree = agree
        self.steps = 0  # updates applied
        self.progress = 0.0  # the fraction of the run's steps done, for train.lr_schedule (the loop sets it)
        self.last_lr = 0.0  # the rate of the latest update
        self.warm = False  # True once it carries on from other optimisers' moments: no warm-up then
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.bad_in_a_row = 0
        self.feed = None  # an EmaFeed (train.feed_ema) where the next part trains on averaged weights' output

    def lr(self) -> float:
        """Linear warm-up to the base rate (early NaNs in Glow are cured by warm-up), times the run's
        decay: over the run's steps, not this optimiser's, so that every part and phase follows one curve."""
        warmup = self.cfg.warmup_steps
        rate = self.base_lr * decay(self.cfg.lr_schedule, self.progress)
        if self.warm or not warmup:
            return rate
        return rate * min(1.0, (self.steps + 1) / warmup)

    def carry_on_from(self, states: dict[nn.Parameter, dict]) -> int:
        """Start from the optimiser moments the parts' own optimisers had built up by parts.

        Fine-tuning the glued flow with a fresh Adam throws those away: its first updates are
        then sized by a one-sample second moment, and a second warm-up holds the rate down
        for as long again. With the moments carried over, fine-tuning continues where the
        by-parts phase left off. ``states`` maps a parameter to its optimiser state (e.g.
        ``exp_avg``, ``exp_avg_sq``, ``step``); parameters this trainer does not train (a
        learned boundary prior) are ignored. Only when every parameter carries on is the
        warm-up skipped: one that starts afresh (its part never trained) needs it. Returns how
        many parameters carried on.
        """
        carried = 0
        for p in self.params:
            if p in states:
                self.optimizer.state[p] = {k: v.detach().clone() for k, v in states[p].items()}
                carried += 1
        self.warm = carried == len(self.params)
        return carried

    def train_step(self, h: torch.Tensor, carry: torch.Tensor) -> tuple[PartOutput, float, float]:
        """One update on a detached input. Returns the output (detached), the loss and the mean prefix bits/dim.

        Deciding whether to skip the update needs the loss on the host: that is the step's one
        host sync, and the two figures come back with it.
        """
        out = self._objective(h, carry)
        if self.optimizer is None:
            loss_value, bpd = torch.stack([out.loss.detach(), out.prefix_bpd.mean().to(out.loss.dtype)]).tolist()
            return self._detached(out), loss_value, bpd
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_hook is not None:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grad_hook([p.grad for p in self.params])
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:  # not clipped, still checked: a finite loss can have a non-finite gradient
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = (torch.isfinite(out.loss) & torch.isfinite(grad_norm)).to(out.loss.dtype)
        loss_value, bpd, finite = torch.stack([out.loss.detach(), out.prefix_bpd.mean().to(out.loss.dtype),
                                               finite]).tolist()
        finite = bool(finite)
        if self.agree is not None:
            finite = self.agree(finite)
        self.apply(finite)
        return self._detached(out), loss_value, bpd

    def apply(self, finite: bool) -> None:
        """Update from the gradients now held, or skip a non-finite step (which then changes nothing:
        no update, no optimiser state, no warm-up progress); too many in a row stop the run."""
        if not finite:
            self.skipped += 1
            self.bad_in_a_row += 1
            self.optimizer.zero_grad(set_to_none=True)
            check_invertible(self.part, self.name)  # a singular layer is named, not left as a NaN
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.name}: {self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps); "
                    "lower train.lr or raise train.warmup_steps"
                )
            return
        self.bad_in_a_row = 0
        self.last_lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        self.optimizer.step()
        self.steps += 1
        if self.feed is not None:  # the moving average a later part is fed from
            self.feed.update()

    def _objective(self, h: torch.Tensor, carry: torch.Tensor) -> PartOutput:
        """The part's objective with a graph: compiled (train.compile) once the part has run eagerly.

        The first pass initialises the ActNorms from the data and, afterwards, each one knows it
        is initialised without reading its buffer: run eagerly, it leaves the compiled graph with
        no data-dependent branch to break on (and no recompilation when the flag flips).
        """
        if self.compiled is not None and self.ran_eagerly:
            return self.compiled(h, carry, self.num_dims, self.n_bins)
        self.ran_eagerly = True
        return part_objective(self.module, h, carry, self.num_dims, self.n_bins)

    @torch.no_grad()
    def forward(self, h: torch.Tensor, carry: torch.Tensor) -> PartOutput:
        """Forward only, no graph, with the prior's terms: evaluation and the ActNorms' start (always eager)."""
        self.ran_eagerly = True
        return part_objective(self.module, h, carry, self.num_dims, self.n_bins)

    @torch.no_grad()
    def hand_on(self, h: torch.Tensor, carry: torch.Tensor) -> PartOutput:
        """Forward only, for a part that merely feeds a later one: its output, not its prior's terms.
        (The prior's ActNorms have started by then: a run's first message, INIT, runs every part's ``forward``.)"""
        self.ran_eagerly = True
        return hand_on(self.likelihood, h, carry)

    @staticmethod
    def _detached(out: PartOutput) -> PartOutput:
        return PartOutput(out.h.detach(), out.loss.detach(), out.carry, out.prefix_bpd)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "steps": self.steps, "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row, "warm": self.warm,
                "feed": self.feed.state_dict() if self.feed is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # the rate is set anew each step from train.lr
        self.steps, self.skipped = state["steps"], state["skipped"]
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.warm = state.get("warm", False)
        if self.feed is not None and state.get("feed") is not None:
            self.feed.load_state_dict(state["feed"])
