"""The by-parts phase on P ranks: receive a latent, train this rank's part on it, send it on.

Every stage runs the same loop over a stream of messages. Stage 0's stream is made from
the data; every later stage's arrives from the stage before it. A stage never sends
anything backwards, and no collective runs in this loop (but gradient averaging among
the replicas of one stage when the world holds several pipelines).

    INIT      the first batch, forward only: every ActNorm initialises from it
    TRAIN     train this part on the batch, pass the detached output on
    EVAL      forward only, accumulate prefix bits/dim, pass on
    EVAL_END  the test set is done: record the stage's mean prefix bits/dim
    STOP      the phase is over
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch

from pipeflow.distributed.transport import EVAL, EVAL_END, INIT, STOP, TRAIN, Inbox, Message, Outbox


class StageTrainer(Protocol):
    """What a stage needs of its part: one update, or one forward pass (see PartTrainer)."""

    def train_step(self, h: torch.Tensor, carry: torch.Tensor): ...

    def forward(self, h: torch.Tensor, carry: torch.Tensor): ...


@dataclass
class StageReport:
    rank: int
    stage: int
    replica: int
    steps: int = 0
    images: int = 0
    busy_seconds: float = 0.0  # inside the part's forward/backward/update
    seconds: float = 0.0  # the whole phase, waiting included
    records: list[dict] = field(default_factory=list)  # logged steps
    evals: list[dict] = field(default_factory=list)  # per-epoch mean prefix bits/dim at this stage

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.seconds if self.seconds else 0.0


def data_messages(epochs: int, train_epoch: Callable[..., Iterable[torch.Tensor]],
                  test_batches: Callable[[], Iterable[torch.Tensor]] | None, init_batch: torch.Tensor | None,
                  device: torch.device, start_step: int = 0, steps_per_epoch: int = 0) -> Iterator[Message]:
    """Stage 0's stream: the init batch, then each epoch's batches and (if asked) the test set.

    Resuming after ``start_step`` steps (``steps_per_epoch`` per epoch): no init batch (the
    ActNorms come initialised from the checkpoint), ``train_epoch(epoch, skip)`` from the
    batch after that step on, and first the evaluation of an epoch that ended at that step
    (checkpoints are taken at TRAIN messages, so none holds the evaluation that follows).
    """

    def msg(kind, x, epoch, step):
        x = x.to(device)
        return Message(kind, len(x), epoch, step, x, torch.zeros(len(x), device=device))

    def evaluation(epoch, step):
        if test_batches is not None:
            for x in test_batches():
                yield msg(EVAL, x, epoch, step)
            yield Message(EVAL_END, 0, epoch, step)

    first_epoch, skip = 0, 0
    if start_step:
        if steps_per_epoch < 1:
            raise ValueError("resuming the data stream needs steps_per_epoch")
        first_epoch, skip = divmod(start_step, steps_per_epoch)
        if skip == 0:
            yield from evaluation(first_epoch - 1, start_step)
    else:
        yield msg(INIT, init_batch, 0, 0)
    step = start_step
    for epoch in range(first_epoch, epochs):
        for x in (train_epoch(epoch, skip) if epoch == first_epoch and skip else train_epoch(epoch)):
            step += 1
            yield msg(TRAIN, x, epoch, step)
        yield from evaluation(epoch, step)
    yield Message(STOP, 0, epochs, step)


def inbox_messages(inbox: Inbox) -> Iterator[Message]:
    while True:
        msg = inbox.recv()
        yield msg
        if msg.kind == STOP:
            return


def run_stage(report: StageReport, trainer: StageTrainer, messages: Iterable[Message], outbox: Outbox | None,
              log_every: int = 10, on_eval: Callable[[dict], None] | None = None,
              on_train: Callable[[Message, StageReport], None] | None = None) -> StageReport:
    """Drive one stage through the phase; returns what it did and how busy it was.

    ``on_train(msg, report)`` runs after each TRAIN message has been handled and passed on
    (to checkpoint; ``report.seconds`` is then the time so far). A ``report`` restored from
    a checkpoint goes on counting from where it was.
    """
    start = time.perf_counter()
    before = report.seconds  # time spent by earlier attempts (resuming), else 0
    eval_sum, eval_count = 0.0, 0
    last_step_end = start
    for msg in messages:
        out = None
        if msg.kind in (INIT, TRAIN, EVAL):
            t0 = time.perf_counter()
            if msg.kind == TRAIN:
                out, loss = trainer.train_step(msg.h, msg.carry)
                bpd = float(out.prefix_bpd.mean())
                report.steps += 1
                report.images += msg.rows
            else:
                out = trainer.forward(msg.h, msg.carry)
                if msg.kind == EVAL:
                    eval_sum += float(out.prefix_bpd.double().sum())
                    eval_count += msg.rows
            t1 = time.perf_counter()
            report.busy_seconds += t1 - t0
            if msg.kind == TRAIN and report.steps % log_every == 0:
                report.records.append({
                    "kind": "step", "phase": "by_parts", "part": report.stage, "replica": report.replica,
                    "rank": report.rank, "epoch": msg.epoch, "step": msg.step, "loss": loss, "prefix_bpd": bpd,
                    "images_per_s": msg.rows / max(t1 - last_step_end, 1e-9),
                    "busy_fraction": report.busy_seconds / max(before + t1 - start, 1e-9), "wall": time.time(),
                })
            if msg.kind == TRAIN:
                last_step_end = t1
        elif msg.kind == EVAL_END:
            record = {"epoch": msg.epoch + 1, "step": msg.step, "prefix_bpd": eval_sum / max(eval_count, 1),
                      "seconds": before + time.perf_counter() - start, "busy_seconds": report.busy_seconds}
            report.evals.append(record)
            if on_eval:
                on_eval(record)
            eval_sum, eval_count = 0.0, 0
        if outbox is not None:
            h, carry = (None, None) if out is None else (out.h, out.carry)
            outbox.send(msg.kind, msg.epoch, msg.step, h, carry)
        if msg.kind == TRAIN and on_train is not None:
            c0 = time.perf_counter()
            report.seconds = before + c0 - start
            on_train(msg, report)
            last_step_end += time.perf_counter() - c0  # a checkpoint's write is not the next step's time
        if msg.kind == STOP:
            break
    if outbox is not None:
        outbox.close()
    report.seconds = before + time.perf_counter() - start
    return report
