"""Test-set bits/dim through a chain of parts, and sample grids."""

from __future__ import annotations

from typing import Sequence

import torch

from pipeflow.data import Batches
from pipeflow.part_trainer import PartTrainer


@torch.no_grad()
def evaluate(trainers: Sequence[PartTrainer], batches: Batches, device: torch.device) -> list[float]:
    """Mean prefix bits/dim after each part; the last entry is the whole model's test bits/dim."""
    totals = torch.zeros(len(trainers), dtype=torch.float64)
    count = 0
    for x in batches.epoch(0):
        h = x.to(device)
        carry = torch.zeros(len(h), device=device)
        for k, trainer in enumerate(trainers):
            out = trainer.forward(h, carry)
            h, carry = out.h, out.carry
            totals[k] += out.prefix_bpd.double().sum().cpu()
        count += len(x)
    return (totals / max(count, 1)).tolist()
