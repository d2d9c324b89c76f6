"""Forward-only messages between neighbouring pipeline stages.

A message is a header of four int64 (kind, rows, epoch, step) followed, when it carries
a batch, by one contiguous float32 payload: the latent batch then its per-sample carry.
The payload's shape per row is fixed by the plan of parts, so the ranks never negotiate
shapes, and the header tells the receiver how many rows follow.

Each link (stage k to k+1 of one replica) is a process group of its own, created by every
rank in the same order (:func:`link_groups`), and used by exactly one thread on each side:
the Outbox's sender thread, and the receiving stage's main thread. On NCCL each link thus
has its own communicator, and no communicator is ever driven by two threads at once.
Collectives run on the main thread only, on the default group or a stage's group.

Sending runs on a background thread that issues one blocking send at a time: there is
never more than one outstanding send to a peer (several outstanding isends to one peer
can hang on gloo), while a bounded queue lets ``in_flight`` batches wait for the wire so
that transfers overlap compute and a fast stage cannot run away from a slow one. The
thread can also pace its sends to a given bandwidth, to show what a slow link does.

Receives and sends wait at most ``timeout_s``; a silent peer is an error that names it.
"""

from __future__ import annotations

import enum
import queue
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeflow.distributed.topology import Topology

HEADER = 4  # int64 fields: kind, rows, epoch, step


class Kind(enum.IntEnum):
    """What a message asks of the next stage (see :mod:`pipeflow.loop`, which handles each kind)."""

    INIT = 0
    TRAIN = 1
    EVAL = 2
    EVAL_END = 3
    STOP = 4
    EVAL_EMA = 5  # a test batch for the averaged weights (train.eval_ema), after the raw weights' pass


INIT, TRAIN, EVAL, EVAL_END, STOP, EVAL_EMA = Kind  # the kinds by their bare names, as the pipeline reads them


class PeerSilent(RuntimeError):
    """A neighbouring rank sent nothing for ``timeout_s`` seconds, or its link broke."""


def brief(exc: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without gloo's source location."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


@dataclass
class Message:
    kind: int
    rows: int
    epoch: int
    step: int
    h: torch.Tensor | None = None  # (rows, *shape)
    carry: torch.Tensor | None = None  # (rows,)


@dataclass
class Counters:
    """Bytes moved by this rank, by direction relative to the pipeline."""

    forward_bytes: int = 0  # to a later stage (a higher rank of the same pipeline)
    backward_bytes: int = 0  # to an earlier one: what the by-parts phase never sends
    forward_messages: int = 0
    wire_seconds: float = 0.0
    paced_seconds: float = 0.0  # how long a throttled link (``bandwidth``) held messages back

    def sent(self, rank: int, peer: int, nbytes: int) -> None:
        """Count one message that went out, by the direction it went."""
        if peer > rank:
            self.forward_bytes += nbytes
            self.forward_messages += 1
        else:
            self.backward_bytes += nbytes


def _row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class LinkPacer:
    """A link of ``bandwidth`` bytes/s that carries one thing at a time, for throttling.

    A message occupies the link for ``nbytes / bandwidth`` from when both it and the link are
    free. A link that stood idle banks nothing: what comes after a pause cannot burst past the
    bandwidth. The pipeline's sends and the benchmark's DDP all-reduces are paced alike.
    """

    def __init__(self, bandwidth: float):
        self.bandwidth = bandwidth
        self.free_at = 0.0

    def occupy(self, nbytes: float, now: float) -> float:
        """Put ``nbytes`` on the link at time ``now``; returns when the link has carried them."""
        self.free_at = max(self.free_at, now) + nbytes / self.bandwidth
        return self.free_at


@dataclass(frozen=True)
class Links:
    """This rank's process groups: its link to the previous stage, to the next, and its stage's replicas.

    ``prev`` is used only by the main thread (the Inbox), ``next`` only by the Outbox's sender
    thread, ``stage`` (the replicas of this stage, when R > 1) only by the main thread's
    collectives. None where the rank has no such neighbour.
    """

    prev: object | None = None
    next: object | None = None
    stage: object | None = None


def link_groups(topo: Topology, timeout_s: float) -> Links:
    """Create every stage group and every link group of the world; return this rank's.

    Every rank must call this, on its main thread, before any traffic: torch requires each
    group to be created by all ranks in the same order (stage groups, then the links in
    :meth:`Topology.links` order), and each group gets the run's timeout (a new group
    otherwise takes the backend's default, 10 or 30 minutes).
    """
    timeout = timedelta(seconds=timeout_s)
    stage = None
    if topo.replicas > 1:
        for s in range(topo.stages):
            group = dist.new_group(topo.stage_ranks(s), timeout=timeout)
            if s == topo.stage:
                stage = group
    prev = nxt = None
    for a, b in topo.links():
        group = dist.new_group([a, b], timeout=timeout)
        if b == topo.rank:
            prev = group
        elif a == topo.rank:
            nxt = group
    return Links(prev, nxt, stage)


class _Headers:
    """``count`` header tensors used in turn, so that sending one allocates nothing.

    On CUDA each is filled from a pinned host buffer by an asynchronous copy: no host sync.
    A buffer is written again only ``count`` messages later; with ``count = in_flight + 2``
    the message that used it last has left the wire by then (the queue holds ``in_flight``,
    the thread sends one, and the caller fills one).
    """

    def __init__(self, count: int, device: torch.device):
        pinned = device.type == "cuda"
        self.host = [torch.zeros(HEADER, dtype=torch.int64, pin_memory=pinned) for _ in range(count)]
        self.wire = [t.to(device) for t in self.host] if pinned else self.host
        self.turn = 0

    def fill(self, kind: int, rows: int, epoch: int, step: int) -> torch.Tensor:
        i, self.turn = self.turn, (self.turn + 1) % len(self.host)
        self.host[i].numpy()[:] = (kind, rows, epoch, step)
        if self.wire is not self.host:
            self.wire[i].copy_(self.host[i], non_blocking=True)
        return self.wire[i]


def _wait(work, timeout_s: float) -> None:
    """Wait for a send or receive at most ``timeout_s``: on NCCL too, a wait given a timeout blocks the thread."""
    work.wait(timeout=timedelta(seconds=timeout_s))


class Outbox:
    """Messages to the next stage (a higher rank): the only direction anything travels.

    ``group`` is the link's own process group (:attr:`Links.next`); only this Outbox's thread
    uses it. Its first act is a one-element token that opens the link (on NCCL: sets up the
    link's communicator) before any batch is timed.
    """

    def __init__(self, rank: int, peer: int, shape: tuple[int, ...], device: torch.device,
                 in_flight: int = 2, bandwidth: float = 0.0, counters: Counters | None = None,
                 timeout_s: float = 300.0, group=None):
        if peer <= rank:
            raise ValueError(f"rank {rank} may only send forward, not to rank {peer}")
        self.rank, self.peer, self.shape, self.device = rank, peer, tuple(shape), device
        self.bandwidth = bandwidth  # bytes/s; 0: as fast as the link goes
        self.counters = counters or Counters()
        self.timeout_s, self.group = timeout_s, group
        self._queue: queue.Queue = queue.Queue(maxsize=in_flight)
        self._headers = _Headers(in_flight + 2, device)
        self._error: BaseException | None = None
        # what has been handed over to send, sent or not (a checkpoint counts a queued message as sent:
        # a run resumed from it will not send that message again)
        self.queued_bytes, self.queued_messages = self.counters.forward_bytes, self.counters.forward_messages
        self._thread = threading.Thread(target=self._run, name=f"send-{rank}-to-{peer}", daemon=True)
        self._thread.start()

    def send(self, kind: int, epoch: int = 0, step: int = 0, h: torch.Tensor | None = None,
             carry: torch.Tensor | None = None) -> None:
        """Queue one message; blocks while ``in_flight`` messages are already waiting for the wire."""
        self._raise_if_failed()
        rows = 0 if h is None else h.shape[0]
        payload = None
        if rows:
            if tuple(h.shape[1:]) != self.shape:
                raise ValueError(f"rank {self.rank}: a batch of {tuple(h.shape[1:])} "
                                 f"does not fit the plan's {self.shape}")
            payload = torch.cat([h.detach().reshape(-1).float(), carry.detach().reshape(-1).float()]).contiguous()
        header = self._headers.fill(int(kind), rows, epoch, step)
        ready = None
        if self.device.type == "cuda":  # the thread's stream waits for the kernels that fill these tensors
            ready = torch.cuda.Event()
            ready.record()
        self._put_while_alive((header, payload, ready), "send a message to")
        self.queued_bytes += sum(t.numel() * t.element_size() for t in (header, payload) if t is not None)
        self.queued_messages += 1

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
            # A stream of its own: on NCCL, waiting on a send makes the waiting thread's current
            # stream wait for it, and that must not be the default stream the stage computes on.
            with torch.cuda.stream(torch.cuda.Stream(self.device)):
                self._send_loop()
        else:
            self._send_loop()

    def _send_loop(self) -> None:
        link = LinkPacer(self.bandwidth) if self.bandwidth > 0 else None
        item = (torch.zeros(1, dtype=torch.int64, device=self.device), None, None)  # the token that opens the link
        counted = False
        while item is not None:
            header, payload, ready = item
            try:
                if ready is not None:  # a stream-side wait: the host goes on at once
                    torch.cuda.current_stream().wait_event(ready)
                t0 = time.perf_counter()
                nbytes = 0
                for tensor in (header, payload):
                    if tensor is not None:
                        # isend + wait with a timeout: blocks this thread until the peer has the
                        # tensor (on NCCL too, where a plain send returns at once), and never forever
                        _wait(dist.isend(tensor, dst=self.peer, group=self.group), self.timeout_s)
                        nbytes += tensor.numel() * tensor.element_size()
                if link is not None and counted:  # pace: hold the next message until the link carried this one
                    lag = link.occupy(nbytes, t0) - time.perf_counter()
                    if lag > 0:
                        time.sleep(lag)
                        self.counters.paced_seconds += lag
                if counted:
                    self.counters.wire_seconds += time.perf_counter() - t0
                    self.counters.sent(self.rank, self.peer, nbytes)
            except BaseException as exc:  # noqa: BLE001 (handed to the main thread)
                self._error = PeerSilent(
                    f"rank {self.rank} could not send to rank {self.peer}: rank {self.peer} took nothing for "
                    f"{self.timeout_s:g} s (distributed.timeout_s), or the link broke: {brief(exc)}")
                return
            item, counted = self._queue.get(), True

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
    def close(self) -> None:
        """Flush every queued message, then stop the thread.

        Each send has its own timeout, so this ends; as a guard besides, it gives up once the
        thread has sent nothing for twice ``timeout_s`` (a slow but live peer keeps it going).
        """
        self._put_while_alive(None, "flush its messages to")
        while self._thread.is_alive():
            sent = self.counters.forward_messages
            self._thread.join(2 * self.timeout_s + 5)
            if self._thread.is_alive() and self.counters.forward_messages == sent:
                self._raise_if_failed()
                raise PeerSilent(f"rank {self.rank} could not flush its messages to rank {self.peer} in "
                                 f"{2 * self.timeout_s:g} s (distributed.timeout_s): rank {self.peer} is silent")
        self._raise_if_failed()

    def _put_while_alive(self, item, what: str) -> None:
        """Queue ``item``, waiting while the queue is full and the thread still gets messages out."""
        sent, since = self.counters.forward_messages, time.monotonic()
        while True:
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()
                if self.counters.forward_messages != sent:
                    sent, since = self.counters.forward_messages, time.monotonic()
                elif time.monotonic() - since > 2 * self.timeout_s + 5:  # the thread's own send times out first
                    raise PeerSilent(f"rank {self.rank} could not {what} rank {self.peer} in "
                                     f"{2 * self.timeout_s:g} s (distributed.timeout_s): rank {self.peer} is silent")


class Inbox:
    """Messages from the previous stage, received on the main thread over the link's ``group``.

    Opening it receives the link's token (see :class:`Outbox`). One header buffer serves every
    message; reading it (``tolist``) is the one host sync a receiver needs, to learn how many rows follow.
    """

    def __init__(self, rank: int, peer: int, shape: tuple[int, ...], device: torch.device, timeout_s: float,
                 group=None):
        self.rank, self.peer, self.shape, self.device = rank, peer, tuple(shape), device
        self.row_numel = _row_numel(self.shape)
        self.timeout_s, self.group = timeout_s, group
        self._recv(torch.zeros(1, dtype=torch.int64, device=device))  # the token that opens the link
        self._header = torch.empty(HEADER, dtype=torch.int64, device=device)

    def _recv(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            _wait(dist.irecv(tensor, src=self.peer, group=self.group), self.timeout_s)
        except RuntimeError as exc:  # gloo: RuntimeError; NCCL: DistBackendError, a RuntimeError too
            raise PeerSilent(
                f"rank {self.rank} heard nothing from rank {self.peer} for {self.timeout_s:g} s "
                f"(distributed.timeout_s), or lost the link: {brief(exc)}"
            ) from exc
        return tensor

    def recv(self) -> Message:
        kind, rows, epoch, step = self._recv(self._header).tolist()
        msg = Message(Kind(kind), rows, epoch, step)
        if rows:
            payload = self._recv(torch.empty(rows * (self.row_numel + 1), dtype=torch.float32, device=self.device))
            msg.h = payload[: rows * self.row_numel].view(rows, *self.shape)
            msg.carry = payload[rows * self.row_numel :]
        return msg
