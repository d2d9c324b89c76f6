"""The few collectives pipeflow uses, all outside the by-parts phase's message stream
(except gradient averaging among the replicas of one stage when R > 1)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def agree(ok: bool, device: torch.device) -> bool:
    """True only if every rank says ok: lets all ranks stop together on a setup error."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gradient_averager(group, size: int) -> Callable[[list[torch.Tensor]], None]:
    """A hook that averages gradients over ``group`` in one flat all-reduce; counts the bytes."""

    def average(grads: list[torch.Tensor]) -> None:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat /= size
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
        average.bytes += flat.numel() * flat.element_size()

    average.bytes = 0
    return average


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int, group=None) -> int:
    """Broadcast tensors in place from ``src``; returns the bytes moved per receiving rank."""
    moved = 0
    for t in tensors:
        if t.dtype == torch.bool:  # not every backend broadcasts bool
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, src=src, group=group)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t, src=src, group=group)
        moved += t.numel() * t.element_size()
    return moved


def sum_across(values: list[float], device: torch.device, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def gather_to_rank0(obj):
    """Every rank's ``obj`` on rank 0 (a list by rank), None elsewhere."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
