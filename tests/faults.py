"""Failures injected on purpose, for the tests of resuming, restarts and silent peers.

``python -m tests.faults`` is ``pipeflow.launch`` with these failures injected; it reads
PIPEFLOW_TEST_FAULT, a comma-separated list of
``ACTION:RANK:WHEN[@ATTEMPT]`` with ACTION ``exit`` (the rank ends at once after that
step, its checkpoint saved), ``stop`` (it SIGSTOPs itself: a silent peer), ``nan`` (its
by-parts input is NaN for steps STEP..LAST), ``inf`` (WHEN ``eval``: the first image of each
test batch this rank reads is infinite, in every phase and mode) or ``skew`` (this rank alone starts otherwise, as
a GPU's non-deterministic kernels could make it: WHEN ``build`` nudges its freshly built
weights, ``init`` scales the batch its ActNorms initialise from), on attempt ATTEMPT (default
0, the first). WHEN is a step, ``STEP-LAST`` (``nan``), or for ``stop`` a moment between steps:
``eval`` (at its first evaluation batch), ``gather`` or ``finetune`` (as that step of the run begins).
The library knows none of this: ``pipeflow.launch.main`` only takes hooks after each step, on the
stream of messages and as each step of a multi-rank run begins, which :func:`fault_hooks` fills.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from pipeflow import build, launch, multirank
from pipeflow.multirank import RankHooks
from pipeflow.distributed.transport import EVAL, INIT, TRAIN, Message
from pipeflow.errors import UserError

FAULT_EXIT = 43  # the status of a process that an injected fault ended
ACTIONS = ("exit", "stop", "nan", "inf", "skew")
MOMENTS = ("eval", "gather", "finetune")  # when a ``stop`` may strike besides after a step


@dataclass(frozen=True)
class Fault:
    action: str
    rank: int
    first: int  # a step (-1: at ``moment``)
    last: int
    moment: str = ""


def parse_faults(text: str, attempt: int) -> tuple[Fault, ...]:
    """PIPEFLOW_TEST_FAULT -> the faults to inject on this attempt."""
    faults = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            spec, _, on = item.partition("@")
            action, rank, steps = spec.split(":")
            if ((action == "stop" and steps in MOMENTS) or (action == "skew" and steps in ("build", "init"))
                    or (action == "inf" and steps == "eval")):
                fault = Fault(action, int(rank), -1, -1, steps)
            else:
                first, _, last = steps.partition("-")
                fault = Fault(action, int(rank), int(first), int(last or first))
            if action not in ACTIONS:
                raise ValueError(action)
        except ValueError:
            raise UserError(f"PIPEFLOW_TEST_FAULT: cannot read {item!r} (ACTION:RANK:STEP[-LAST][@ATTEMPT])") from None
        if action == "skew" and fault.moment not in ("build", "init"):
            raise UserError(f"PIPEFLOW_TEST_FAULT: {item!r}: skew strikes at build or init")
        if int(on or 0) == attempt:
            faults.append(fault)
    return tuple(faults)


def _strike(rank: int, action: str, when) -> None:
    sys.stderr.write(f"[rank {rank}] injected fault: {action} {when}\n")
    sys.stderr.flush()
    if action == "exit":
        os._exit(FAULT_EXIT)
    os.kill(os.getpid(), signal.SIGSTOP)


def fault_hooks(rank: int, attempt: int) -> RankHooks:
    """The hooks that strike this rank's faults of PIPEFLOW_TEST_FAULT on this attempt."""
    mine = [f for f in parse_faults(os.environ.get("PIPEFLOW_TEST_FAULT", ""), attempt) if f.rank == rank]
    if not mine:
        return RankHooks()
    if any(f.action == "skew" and f.moment == "build" for f in mine):
        _skew_build(rank)
    if any(f.action == "inf" for f in mine):
        _spoil_tests(rank)

    def after_step(msg: Message) -> None:
        for f in mine:
            if f.first == msg.step and f.action in ("exit", "stop"):
                _strike(rank, f.action, f"after step {msg.step}")

    def filtered(messages: Iterable[Message]) -> Iterator[Message]:
        for msg in messages:
            if msg.kind == TRAIN and any(f.action == "nan" and f.first <= msg.step <= f.last for f in mine):
                msg.h = msg.h * float("nan")
            if msg.kind == INIT and any(f.action == "skew" and f.moment == "init" for f in mine):
                sys.stderr.write(f"[rank {rank}] injected fault: skew init\n")
                msg.h = msg.h * 1.5
            if msg.kind == EVAL and any(f.action == "stop" and f.moment == "eval" for f in mine):
                _strike(rank, "stop", "at the evaluation")
            yield msg

    def on_moment(name: str) -> None:
        if any(f.moment == name for f in mine):
            _strike(rank, "stop", f"as {name} begins")

    needs_filter = any(f.action == "nan" or f.moment in ("eval", "init") for f in mine)
    return RankHooks((after_step,), filtered if needs_filter else None, (on_moment,))


def _skew_build(rank: int) -> None:
    """This process's models come out of build_model nudged (multirank's own name for it is replaced)."""
    built = multirank.build_model

    def nudged(*args, **kwargs):
        model = built(*args, **kwargs)
        sys.stderr.write(f"[rank {rank}] injected fault: skew build\n")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        return model

    multirank.build_model = nudged


def _spoil_tests(rank: int) -> None:
    """The test batches this process reads start with an infinite image (build's own name is replaced, so
    every evaluation reads them: by parts, DDP's and the pipelined fine-tuning's, the final one)."""
    read = build.test_batches

    def spoiled(*args, **kwargs):
        batches = read(*args, **kwargs)
        epoch = batches.epoch

        def first_infinite(e, start=0):
            for x in epoch(e, start):
                yield torch.cat([x[:1] * float("inf"), x[1:]])
        batches.epoch = first_infinite
        sys.stderr.write(f"[rank {rank}] injected fault: inf eval\n")
        return batches

    build.test_batches = spoiled


if __name__ == "__main__":
    launch.run(fault_hooks)
