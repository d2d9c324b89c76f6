"""The one training loop. Every phase of every mode is this loop over a stream of messages:

    for message in stream:        from the data (one device, stage 0) or from the stage before
        INIT      forward only: every ActNorm initialises from the first batch
        TRAIN     one step of the local chain of parts, each on the detached output of the one before
        EVAL      forward only: sum the prefix bits/dim after each local part
        EVAL_EMA  the same on the averaged weights (train.eval_ema), each stage on its own average
        EVAL_END  the test set is done: hand the means to ``hooks.on_eval``
        STOP      the phase is over
        then pass the chain's output on, when there is a stage after this one

What differs between modes is only what the loop is given: one device holds every part
and reads the data; a pipeline stage holds one part, reads an inbox and writes an outbox;
a data-parallel replica holds the whole model (wrapped in DDP) and reads its shard of each
batch. Checkpoints, logs, clocks and injected faults come in through :class:`Hooks`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Iterable, Iterator, Sequence

import torch

from pipeflow.averaging import WeightAverage
from pipeflow.distributed.transport import EVAL, EVAL_EMA, EVAL_END, INIT, STOP, TRAIN, Inbox, Message
from pipeflow.objective import PartOutput
from pipeflow.part_trainer import PartTrainer
from pipeflow.schedules import active_parts


def train_step(trainers: Sequence[PartTrainer], active: Sequence[int], h: torch.Tensor,
               carry: torch.Tensor | None = None) -> tuple[PartOutput | None, list[tuple[int, float, float]]]:
    """One step of a chain of parts: train the ``active`` ones, run the others before them forward only.

    A part with an averaged feed (``train.feed_ema``, :mod:`pipeflow.feed`) hands on its average's
    output instead of its own. Returns the last output handed on and ``(part, loss, mean prefix
    bits/dim)`` per trained part (``part`` counts in the chain). Parts after the last active one
    are not run at all.
    """
    if carry is None and isinstance(h, torch.Tensor):
        carry = torch.zeros(len(h), device=h.device)
    results, out = [], None
    for k in range(max(active) + 1):
        feed = getattr(trainers[k], "feed", None)  # train.feed_ema: the next part trains on averaged weights
        if k in active:
            out, loss, bpd = trainers[k].train_step(h, carry)
            results.append((k, loss, bpd))
            if feed is not None and (k < max(active) or k == len(trainers) - 1):  # its output is used (or sent)
                out = feed.hand_on(h, carry)
        else:
            out = (feed or trainers[k]).hand_on(h, carry)
        h, carry = out.h, out.carry
    return out, results


def forward_chain(trainers: Sequence[PartTrainer], h: torch.Tensor, carry: torch.Tensor) -> list[PartOutput]:
    """Every part forward only, in order; the output after each."""
    outs = []
    for trainer in trainers:
        out = trainer.forward(h, carry)
        outs.append(out)
        h, carry = out.h, out.carry
    return outs


class PhaseName(StrEnum):
    """The phases of a run. Their values are what checkpoints, logs and summaries hold."""

    BY_PARTS = "by_parts"
    FINETUNE = "finetune"  # the glued flow, after the parts
    E2E = "e2e"  # the whole flow from the start


@dataclass
class Tally:
    """What one process did in one phase: steps, images, and where its time went."""

    steps: int = 0
    images: int = 0  # training images this process saw (its shard of each batch, with DDP)
    seconds: float = 0.0  # training time: waiting included, evaluation and checkpoint writes not
    busy_seconds: float = 0.0  # inside the parts' forward, backward and update
    test_bpd: float | None = None  # after the phase's latest evaluation (of the last local part)
    test_bpd_ema: float | None = None  # the same on the averaged weights (Chain.average), if any
    test_nonfinite: int = 0  # test images whose bits/dim after the last local part was not finite, in that evaluation
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (counted at the phase's end)

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.seconds if self.seconds else 0.0


@dataclass
class Chain:
    """The parts this process trains, in flow order, and which of them train on a step."""

    trainers: list[PartTrainer]
    schedule: str = "pipeline"  # see pipeflow.schedules
    epochs: int = 1  # of the phase, for ``sequential``
    first_epoch: int = 0  # the phase's first epoch in the whole run
    alternate_every: int = 0
    first_step: int = 0  # steps the run had done before this phase
    average: WeightAverage | None = None  # averaged weights, updated every step, evaluated beside the raw ones
    run_steps: int = 0  # the whole run's steps (every phase), which train.lr_schedule decays over; 0: none

    def active(self, msg: Message) -> list[int]:
        return active_parts(self.schedule, len(self.trainers), msg.epoch - self.first_epoch,
                            msg.step - 1 - self.first_step, self.epochs, self.alternate_every)

    def index(self, k: int) -> int:
        """Part ``k`` of the chain as the model counts its parts."""
        return getattr(self.trainers[k].part, "index", k)


@dataclass
class Hooks:
    """What a mode adds to the loop. Every hook is optional."""

    log: Callable[[dict], None] | None = None  # a step record due for the log (every log_every updates per part)
    on_step: Callable[[dict], None] | None = None  # every step record (progress display)
    on_eval: Callable[[Message, list[float]], None] | None = None  # mean prefix bits/dim after each local part
    before_step: list[Callable[[Message], None]] = field(default_factory=list)  # clocks (bench)
    after_step: list[Callable[[Message], None]] = field(default_factory=list)  # checkpoints, faults
    pool: Callable[[list[float], int], tuple[list[float], int]] | None = None  # sum evaluation over replicas
    send: Callable[[Message, PartOutput | None], None] | None = None  # to the next stage
    record_extra: dict = field(default_factory=dict)  # fields every step record carries (rank, replica)


class _Clock:
    """Training seconds into a tally, with evaluation and hook time left out."""

    def __init__(self, tally: Tally, on_time: Callable[[float], None] | None):
        self.tally, self.on_time = tally, on_time
        self.mark = time.perf_counter()

    def count(self) -> float:
        now = time.perf_counter()
        self.tally.seconds += now - self.mark
        if self.on_time:
            self.on_time(now - self.mark)
        self.mark = now
        return now

    def skip(self) -> None:
        self.mark = time.perf_counter()


def run_loop(chain: Chain, stream: Iterable[Message], tally: Tally, hooks: Hooks, phase: str,
             log_every: int = 10, on_time: Callable[[float], None] | None = None) -> None:
    """Drive ``chain`` through one phase's ``stream``; see the module's docstring."""
    clock = _Clock(tally, on_time)
    sums, count = None, 0  # per local part, on the device: read back once, at EVAL_END
    for msg in stream:
        out = None
        if msg.kind == TRAIN:
            for hook in hooks.before_step:
                hook(msg)
            out, records = _train(chain, msg, tally, phase)
            if chain.average is not None:
                chain.average.update()
            clock.count()
            _emit(chain, records, hooks, log_every)
        elif msg.kind in (INIT, EVAL, EVAL_EMA):
            if msg.kind == EVAL and count == 0:
                clock.count()  # the evaluation's time is not training time
            outs = _forward(chain, msg)
            out = outs[-1]
            if msg.kind != INIT:
                batch = _eval_sums(chain, outs, averaged=msg.kind == EVAL_EMA)
                sums = batch if sums is None else sums + batch
                count += msg.rows if msg.kind == EVAL else 0
        elif msg.kind == EVAL_END:
            width = 2 * len(chain.trainers) * (2 if chain.average is not None else 1)
            _evaluated(msg, sums.tolist() if sums is not None else [0.0] * width, count, tally, hooks,
                       len(chain.trainers))
            sums, count = None, 0
            clock.skip()
        if hooks.send is not None:
            hooks.send(msg, out)
        if msg.kind == TRAIN:
            clock.count()  # waiting for the next stage to take the output is training time
            for hook in hooks.after_step:
                hook(msg)
            clock.skip()  # a checkpoint's write is not
        if msg.kind == STOP:
            break
    if count == 0:
        clock.count()


def _train(chain: Chain, msg: Message, tally: Tally, phase: str) -> tuple[PartOutput, list[tuple[int, dict]]]:
    t0 = time.perf_counter()
    h = msg.rows if msg.h is None else msg.h  # a batch another process holds: only its size
    for trainer in chain.trainers if chain.run_steps else ():
        trainer.progress = (msg.step - 1) / chain.run_steps
    out, results = train_step(chain.trainers, chain.active(msg), h, msg.carry)
    elapsed = time.perf_counter() - t0
    tally.busy_seconds += elapsed
    tally.steps += 1
    tally.images += msg.rows
    records = [(k, {"kind": "step", "phase": phase, "part": chain.index(k), "epoch": msg.epoch, "step": msg.step,
                    "loss": loss, "prefix_bpd": bpd, "lr": chain.trainers[k].last_lr,
                    "images_per_s": msg.rows / max(elapsed, 1e-9)})
               for k, loss, bpd in results]
    return out, records


def _emit(chain: Chain, records: list[tuple[int, dict]], hooks: Hooks, log_every: int) -> None:
    for k, record in records:
        record.update(hooks.record_extra)
        if hooks.on_step:
            hooks.on_step(record)
        if hooks.log and chain.trainers[k].steps % log_every == 0:  # per part: alternate must not alias
            hooks.log({**record, "wall": time.time()})


def _forward(chain: Chain, msg: Message) -> list[PartOutput]:
    """A forward pass of the chain, on the averaged weights for an EVAL_EMA message."""
    if msg.kind != EVAL_EMA:
        return forward_chain(chain.trainers, msg.h, msg.carry)
    with chain.average.applied():
        return forward_chain(chain.trainers, msg.h, msg.carry)


def _eval_sums(chain: Chain, outs: list[PartOutput], averaged: bool) -> torch.Tensor:
    """Summed prefix bits/dim after each local part, then how many images gave no finite figure there: the
    raw weights' first, then (with an average) the averaged ones'; this message fills its half, the other
    stays zero. One overflowing image makes a mean infinite; the count says it was one."""
    bpd = [o.prefix_bpd.double() for o in outs]
    sums = torch.cat([torch.stack([b.sum() for b in bpd]), torch.stack([(~b.isfinite()).sum().double() for b in bpd])])
    if chain.average is None:
        return sums
    return torch.cat([torch.zeros_like(sums), sums] if averaged else [sums, torch.zeros_like(sums)])


def _evaluated(msg: Message, sums: list[float], count: int, tally: Tally, hooks: Hooks, parts: int) -> None:
    if hooks.pool is not None:
        sums, count = hooks.pool(sums, count)
    raw, averaged = sums[: 2 * parts], sums[2 * parts :]  # the raw weights', then the averaged ones' (if any)
    means = [s / max(count, 1) for s in raw[:parts]]
    averaged = [s / max(count, 1) for s in averaged[:parts]]
    tally.test_nonfinite = int(raw[-1]) if raw else 0
    tally.test_bpd = means[-1] if means else None
    tally.test_bpd_ema = averaged[-1] if averaged else None
    if hooks.on_eval:
        hooks.on_eval(msg, means)


# --- streams -----------------------------------------------------------------------------------


@dataclass
class DataStream:
    """A phase's messages made from the data: what one device and pipeline stage 0 read.

    ``train_epoch(epoch, skip)`` yields that epoch's batches from batch ``skip`` on (this
    process's rows of each); ``test_epoch()`` the test batches, or None where this process
    does not evaluate. Epochs and steps are counted over the whole run, so that a phase's
    batches do not depend on how the run was cut into phases.
    """

    train_epoch: Callable[[int, int], Iterable[torch.Tensor]]
    test_epoch: Callable[[], Iterable[torch.Tensor]] | None
    device: torch.device
    steps_per_epoch: int
    averaged: bool = False  # the test batches once more for the averaged weights (EVAL_EMA)

    def _msg(self, kind: int, x: torch.Tensor | int, epoch: int, step: int) -> Message:
        if isinstance(x, int):  # a step whose batch another process holds: only its size
            return Message(kind, x, epoch, step)
        x = x.to(self.device)
        return Message(kind, len(x), epoch, step, x, torch.zeros(len(x), device=self.device))

    def _evaluation(self, epoch: int, step: int) -> Iterator[Message]:
        if self.test_epoch is not None:
            for kind in (EVAL, EVAL_EMA) if self.averaged else (EVAL,):
                for x in self.test_epoch():
                    yield self._msg(kind, x, epoch, step)
            yield Message(EVAL_END, 0, epoch, step)

    def phase(self, first_epoch: int, epochs: int, start_step: int,
              init: torch.Tensor | None = None) -> Iterator[Message]:
        """Epochs ``first_epoch .. first_epoch + epochs - 1``, resumed after global step ``start_step``.

        Resuming at an epoch's end first evaluates that epoch: checkpoints are taken at
        training steps, so none holds the evaluation that follows its step.
        """
        spe = self.steps_per_epoch
        begin = max(start_step, first_epoch * spe)
        epoch, skip = divmod(begin, spe)
        if begin > first_epoch * spe and skip == 0:
            yield from self._evaluation(epoch - 1, begin)
        if init is not None:
            yield self._msg(INIT, init, first_epoch, begin)
        step = begin
        for e in range(epoch, first_epoch + epochs):
            for x in self.train_epoch(e, skip if e == epoch else 0):
                step += 1
                yield self._msg(TRAIN, x, e, step)
            yield from self._evaluation(e, step)
        yield Message(STOP, 0, first_epoch + epochs, step)


def inbox_stream(inbox: Inbox) -> Iterator[Message]:
    """A later pipeline stage's messages: whatever the stage before it sends, up to STOP."""
    while True:
        msg = inbox.recv()
        yield msg
        if msg.kind == STOP:
            return


def evaluate(trainers: Sequence[PartTrainer], batches, device: torch.device) -> list[float]:
    """Mean prefix bits/dim after each part over ``batches`` (the last: the whole model's test bits/dim).

    The loop itself, over a stream of evaluation messages alone.
    """
    means: list[float] = []
    stream = DataStream(lambda e, skip: (), lambda: batches.epoch(0), device, 1)._evaluation(0, 0)
    hooks = Hooks(on_eval=lambda msg, m: means.extend(m))
    run_loop(Chain(list(trainers)), stream, Tally(), hooks, "eval")
    return means
