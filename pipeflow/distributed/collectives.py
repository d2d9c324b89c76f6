"""The few collectives pipeflow uses, all outside the by-parts phase's message stream
(except, among the replicas of one stage when R > 1, one broadcast of replica 0's weights after
the ActNorms initialise, then the gradient average and the agreement on skipping a step).

Every collective waits at most the process group's timeout (``distributed.timeout_s``,
given to ``init_process_group``); :func:`guard` turns a collective that timed out or lost a
peer into :class:`~pipeflow.distributed.transport.PeerSilent` with one readable line.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pipeflow.distributed.transport import LinkPacer, PeerSilent, brief

# torch.distributed, and DDP (torch.nn.parallel), which calls it
_TORCH_DISTRIBUTED = (Path(dist.__file__).parent, Path(torch.nn.parallel.__file__).parent)


def _raised_by_torch_distributed(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a torch.distributed call (its traceback passes through that package)."""
    tb = exc.__traceback__
    while tb is not None:
        if any(Path(tb.tb_frame.f_code.co_filename).is_relative_to(p) for p in _TORCH_DISTRIBUTED):
            return True
        tb = tb.tb_next
    return False


def is_peer_trouble(exc: BaseException) -> bool:
    """A timeout or a lost peer, told by the error's type or origin, never by its words.

    NCCL and the stores raise torch's ``DistError`` kinds (DistBackendError on a timed-out or
    aborted work, DistNetworkError, DistStoreError). Gloo raises a plain RuntimeError on a
    timeout or a closed pair ("Application timeout caused pair closure"), so for gloo the cause
    is where it came from: a RuntimeError of exactly that type raised inside torch.distributed.
    Under NCCL such an error is a misuse (a CPU tensor handed to a collective): it must surface as
    itself, not as a silent peer. Our own errors (PeerSilent, TrainingDiverged, ...) are never
    peer trouble to re-word.
    """
    if isinstance(exc, dist.DistError):
        return True
    gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    return gloo and type(exc) is RuntimeError and _raised_by_torch_distributed(exc)


@contextlib.contextmanager
def guard(what: str, timeout_s: float, watch: "CollectiveWatch | None" = None) -> Iterator[None]:
    """Run collectives; a timeout or a lost peer becomes PeerSilent naming this rank and ``what``.

    ``watch``: collectives run out of sight (DDP's all-reduce, whose failure reaches the caller
    through autograd as a bare RuntimeError) record their own failure there.
    """
    try:
        yield
    except RuntimeError as exc:
        if not is_peer_trouble(exc) and (watch is None or watch.failure is None):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerSilent(f"rank {rank}: {what} got no answer from every rank within {timeout_s:g} s "
                         f"(distributed.timeout_s), or lost one: {brief(exc)}") from exc


class CollectiveWatch:
    """DDP's gradient all-reduce, as a comm hook's state (:func:`watched_allreduce`).

    It averages each bucket, as DDP's default hook does, and keeps its own failure, which
    otherwise reaches the caller through autograd as a bare RuntimeError. It counts the
    bytes and, given a ``bandwidth`` (bytes/s per rank, to play a slow network), holds each
    bucket until such a link could have carried it: a ring all-reduce makes every rank send
    2 (W-1)/W of the bucket, and buckets queue on the link one after another while the
    backward pass goes on, as it does with the default hook.
    """

    def __init__(self, world: int, bandwidth: float = 0.0):
        self.world = world
        self.failure: BaseException | None = None
        self.link = LinkPacer(bandwidth) if bandwidth > 0 else None
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.payload_bytes, self.wire_bytes, self.buckets, self.paced_seconds = 0, 0.0, 0, 0.0


def watched_allreduce(watch: CollectiveWatch, bucket):  # no annotation: DDP checks a comm hook's literally
    tensor = bucket.buffer().div_(watch.world)
    nbytes = tensor.numel() * tensor.element_size()
    wire = 2.0 * (watch.world - 1) / watch.world * nbytes  # what a ring all-reduce makes each rank send
    watch.payload_bytes += nbytes
    watch.wire_bytes += wire
    watch.buckets += 1

    def reduced(fut):
        try:
            return fut.value()[0]
        except Exception as exc:  # noqa: BLE001 (kept, then passed on to DDP as it was)
            watch.failure = exc
            raise

    fut = dist.all_reduce(tensor, async_op=True).get_future()
    if watch.link is None:
        return fut.then(reduced)
    with watch.lock:
        due = watch.link.occupy(wire, time.perf_counter())
    return _held_until(fut, due, watch, reduced, tensor.device)


def _held_until(fut, due: float, watch: CollectiveWatch, reduced, device: torch.device):
    """A future for ``fut``'s result, set no earlier than ``due`` (perf_counter seconds).

    Held with a timer, never a sleep: a NCCL future completes as soon as the all-reduce is
    queued, so its callbacks run on the autograd thread, and a sleep there would stall the
    backward pass instead of overlapping it.
    """
    held = torch.futures.Future(devices=[device] if device.type == "cuda" else None)

    def release(f):
        try:
            result = reduced(f)
        except Exception as exc:  # noqa: BLE001 (DDP must hear of it, not wait forever)
            held.set_exception(exc)
            return
        lag = due - time.perf_counter()
        if lag <= 0:
            held.set_result(result)
            return
        with watch.lock:
            watch.paced_seconds += lag
        if not result.is_cuda:
            threading.Timer(lag, held.set_result, args=(result,)).start()
            return
        # A CUDA future marks itself complete on the current stream of the thread that sets its
        # result: set it on this callback's stream (which has waited for the all-reduce), not on
        # the timer thread's default one, and on the result's device.
        stream = torch.cuda.current_stream(result.device)

        def later():
            with torch.cuda.device(result.device), torch.cuda.stream(stream):
                held.set_result(result)

        threading.Timer(lag, later).start()

    fut.add_done_callback(release)
    return held


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
    """Broadcast tensors in place from ``src``; returns the bytes moved per receiving rank.

    What travels is each tensor's elements in their logical (NCHW) order: a backend sends a tensor's
    memory as it lies, so two ranks holding one tensor in different layouts (a channels_last
    parameter, an optimiser moment loaded from an NCHW checkpoint) would otherwise mix its elements.
    """
    moved = 0
    for t in tensors:
        # bool: not every backend broadcasts it
        wire = t.to(torch.uint8).contiguous() if t.dtype == torch.bool else t.contiguous()
        dist.broadcast(wire, src=src, group=group)
        if wire is not t:
            t.copy_(wire)
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
