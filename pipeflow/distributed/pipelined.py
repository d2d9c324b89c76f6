"""End-to-end pipeline parallelism: one stage per rank, gradients sent back, through ``torch.distributed.pipelining``.

The forward-only pipeline (:mod:`pipeflow.distributed.transport`) sends detached latents
one way. Here the stages form one differentiable chain: a batch is cut into microbatches,
each stage runs its module on what the stage before it sent, the last stage turns its output
into a loss, and the gradient of every output travels back to the stage that made it. The
schedule decides the order: GPipe runs every forward, then every backward; 1F1B starts the
backwards as soon as the last stage can, so a stage holds at most ``stages`` microbatches'
activations instead of all of them.

This module knows nothing of flows: it wraps the ``nn.Module`` it is given, moves its tensors
and counts what it moved. The gradients it leaves in the module's parameters are the mean over
the microbatches (``scale_grads``): with equal microbatches and a loss that is a mean, the
gradient of the whole batch, as one device computes it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Counted(nn.Module):
    """The stage's module, measuring what one row sends: its outputs forwards, its inputs' gradients back.

    Per row, not per call: the stage also runs the module once to learn the shapes it sends,
    and that run sends nothing.
    """

    def __init__(self, module: nn.Module, sends_forward: bool, sends_backward: bool):
        super().__init__()
        self.module = module
        self.sends_forward, self.sends_backward = sends_forward, sends_backward
        self.forward_per_row = self.backward_per_row = 0.0

    def forward(self, *inputs):
        out = self.module(*inputs)
        rows = len(inputs[0])
        if self.sends_forward:
            self.forward_per_row = _nbytes(out if isinstance(out, tuple) else (out,)) / rows
        if self.sends_backward and torch.is_grad_enabled():
            self.backward_per_row = max(self.backward_per_row, _nbytes(t for t in inputs if t.requires_grad) / rows)
        return out


def pipeline_groups(stages: int, replicas: int, rank: int, timeout_s: float):
    """One process group per replica's chain of stages (ranks ``r*stages .. r*stages+stages-1``); this rank's.

    Every rank creates every group, in the same order. With one replica the world is the chain.
    """
    if replicas == 1:
        return None
    mine = None
    for r in range(replicas):
        group = dist.new_group(list(range(r * stages, (r + 1) * stages)), timeout=timedelta(seconds=timeout_s))
        if r == rank // stages:
            mine = group
    return mine


class PipelinedStage:
    """This rank's stage of a module chain trained end to end with a GPipe or 1F1B schedule.

    ``module`` takes what the stage before it returns (the first stage: the batch) and
    returns a tensor or a tuple of tensors for the next stage; the last stage's output goes
    to ``loss_fn(output, target)``, a mean over the microbatch. ``timed``: clock the stage's
    passes (:attr:`compute_seconds`), for the bench's idle share.
    """

    def __init__(self, module: nn.Module, stage: int, stages: int, device: torch.device, microbatches: int,
                 schedule: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group=None,
                 timed: bool = False):
        self.index, self.stages, self.microbatches = stage, stages, microbatches
        self.forward_bytes = self.backward_bytes = 0
        self.counted = _Counted(module, sends_forward=stage < stages - 1, sends_backward=stage > 0)
        self.stage = PipelineStage(self.counted, stage, stages, device, group=group)
        self.schedule = SCHEDULES[schedule](self.stage, microbatches, loss_fn=loss_fn, scale_grads=True)
        self.compute_seconds = 0.0  # with ``timed``: inside the microbatches' passes, not waiting (bench)
        for name in ("forward_one_chunk", "backward_one_chunk") if timed else ():
            setattr(self.stage, name, self._timed(getattr(self.stage, name)))

    def _timed(self, fn):
        """``fn`` with its time added to ``compute_seconds`` (on a GPU, after the device has finished)."""
        def timed(*args, **kwargs):
            _sync(self.stage.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.stage.device)
            self.compute_seconds += time.perf_counter() - start
            return out
        return timed

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.stages - 1

    def step(self, batch: torch.Tensor | None, rows: int) -> float | None:
        """One forward and backward pass of a batch of ``rows`` rows (the first stage gives ``batch``).

        Gradients accumulate into the module's parameters (zero them before). Returns the
        batch's mean loss on the last stage, None elsewhere.
        """
        if not self.is_last:
            self.schedule.step(*((batch,) if self.is_first else ()))
            self._count(rows)
            return None
        losses: list[torch.Tensor] = []
        target = torch.zeros(rows, device=self.stage.device)
        args = (batch,) if self.is_first else ()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        self._count(rows)
        return float(torch.stack([loss.detach() for loss in losses]).mean())

    def _count(self, rows: int) -> None:
        self.forward_bytes += round(rows * self.counted.forward_per_row)
        self.backward_bytes += round(rows * self.counted.backward_per_row)

    @property
    def bytes_sent(self) -> tuple[int, int]:
        """Bytes this stage has sent forwards (activations) and backwards (gradients) so far."""
        return self.forward_bytes, self.backward_bytes


def forward_only(module: nn.Module, stage: int, stages: int, batches, in_shapes: list[tuple[int, ...]],
                 device: torch.device, group=None):
    """Every batch through the chain with no graph; yields the last stage's outputs (on the last stage).

    Batches may differ in size (a test set's last batch): before each one the stage before
    sends its row count, then each tensor; a count of -1 ends the pass. ``in_shapes``: the
    per-row shape of each tensor this stage receives. The first stage gives ``batches``.
    """
    prev = None if stage == 0 else _peer(stage - 1, group)
    nxt = None if stage == stages - 1 else _peer(stage + 1, group)
    rows = torch.zeros(1, dtype=torch.int64, device=device)  # on the device: NCCL sends nothing else
    source = iter(batches) if stage == 0 else None
    while True:
        if stage == 0:
            x = next(source, None)
            inputs = None if x is None else (x.to(device),)
            n = -1 if x is None else len(x)
        else:
            dist.recv(rows, src=prev)
            n = int(rows)
            inputs = None if n < 0 else tuple(_recv(n, shape, device, prev) for shape in in_shapes)
        if nxt is not None:
            dist.send(torch.tensor([n], device=device), dst=nxt)
        if inputs is None:
            return
        with torch.no_grad():
            out = module(*inputs)
        if nxt is None:
            yield out
        else:
            for t in out if isinstance(out, tuple) else (out,):
                dist.send(t.contiguous(), dst=nxt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peer(stage: int, group) -> int:
    return stage if group is None else dist.get_global_rank(group, stage)


def _recv(rows: int, shape: tuple[int, ...], device: torch.device, src: int) -> torch.Tensor:
    t = torch.empty(rows, *shape, device=device)
    dist.recv(t, src=src)
    return t
