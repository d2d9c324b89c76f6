"""The few collectives pipeflow uses, all outside the by-parts phase's message stream
(except gradient averaging among the replicas of one stage when R > 1).

Every collective waits at most the process group's timeout (``distributed.timeout_s``,
given to ``init_process_group``); :func:`guard` turns a collective that timed out or lost a
peer into :class:`~pipeflow.distributed.transport.PeerSilent` with one readable line.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pipeflow.distributed.transport import PeerSilent, brief

# what gloo and NCCL say when a peer is silent or gone
_PEER_TROUBLE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl", "gloo",
                 "socket", "peer")


@contextlib.contextmanager
def guard(what: str, timeout_s: float) -> Iterator[None]:
    """Run collectives; a timeout or a lost peer becomes PeerSilent naming this rank and ``what``."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        text = str(exc)
        # PeerSilent, TrainingDiverged, ...: ours, already clear
        ours = type(exc) is not RuntimeError and not isinstance(exc, dist.DistError)
        if ours or not any(word in text.lower() for word in _PEER_TROUBLE):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerSilent(f"rank {rank}: {what} got no answer from every rank within {timeout_s:g} s "
                         f"(distributed.timeout_s), or lost one: {brief(exc)}") from None


def agree(ok: bool, device: torch.device, group=None) -> bool:
    """True only if every rank (of ``group``) says ok: lets all ranks stop together on a setup error."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
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


def gather_all(obj: Any) -> list:
    """Every rank's ``obj``, on every rank (a list by rank)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src``, on every rank."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
