"""Test-set bits/dim through a chain of parts, and sample grids."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pipeflow.data import Batches
from pipeflow.part_trainer import PartTrainer


@torch.no_grad()
def evaluation_sums(trainers: Sequence[PartTrainer], batches: Batches, device: torch.device,
                    shard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[list[float], int]:
    """Sums of per-image prefix bits/dim after each part, and the number of images."""
    totals = torch.zeros(len(trainers), dtype=torch.float64)
    count = 0
    for x in batches.epoch(0):
        x = shard(x) if shard else x
        h = x.to(device)
        carry = torch.zeros(len(h), device=device)
        for k, trainer in enumerate(trainers):
            out = trainer.forward(h, carry)
            h, carry = out.h, out.carry
            totals[k] += out.prefix_bpd.double().sum().cpu()
        count += len(x)
    return totals.tolist(), count


def evaluate(trainers: Sequence[PartTrainer], batches: Batches, device: torch.device) -> list[float]:
    """Mean prefix bits/dim after each part; the last entry is the whole model's test bits/dim."""
    totals, count = evaluation_sums(trainers, batches, device)
    return [t / max(count, 1) for t in totals]
