"""Failures injected on purpose, for the tests of resuming, restarts and silent peers.

``pipeflow.launch`` reads PIPEFLOW_TEST_FAULT: a comma-separated list of
``ACTION:RANK:STEP[-LAST][@ATTEMPT]`` with ACTION ``exit`` (the rank ends at once after that
step, its checkpoint saved), ``stop`` (it SIGSTOPs itself: a silent peer) or ``nan`` (its
by-parts input is NaN for steps STEP..LAST), on attempt ATTEMPT (default 0, the first).
The training code knows none of this: it only offers hooks after each step and on the
stream of messages, which :func:`fault_hooks` fills.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from pipeflow.distributed.transport import TRAIN, Message
from pipeflow.errors import UserError

FAULT_EXIT = 43  # the status of a process that an injected fault ended
ACTIONS = ("exit", "stop", "nan")


@dataclass(frozen=True)
class Fault:
    action: str
    rank: int
    first: int
    last: int


def parse_faults(text: str, attempt: int) -> tuple[Fault, ...]:
    """PIPEFLOW_TEST_FAULT -> the faults to inject on this attempt."""
    faults = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            spec, _, on = item.partition("@")
            action, rank, steps = spec.split(":")
            first, _, last = steps.partition("-")
            fault = Fault(action, int(rank), int(first), int(last or first))
            if action not in ACTIONS:
                raise ValueError(action)
        except ValueError:
            raise UserError(f"PIPEFLOW_TEST_FAULT: cannot read {item!r} (ACTION:RANK:STEP[-LAST][@ATTEMPT])") from None
        if int(on or 0) == attempt:
            faults.append(fault)
    return tuple(faults)


def fault_hooks(faults: tuple[Fault, ...], rank: int):
    """``(after_step, stream_filter)`` for this rank: hooks the training loop calls, or None."""
    mine = [f for f in faults if f.rank == rank]
    if not mine:
        return None, None

    def after_step(msg: Message) -> None:
        for f in mine:
            if f.first == msg.step and f.action in ("exit", "stop"):
                sys.stderr.write(f"[rank {rank}] injected fault: {f.action} after step {msg.step}\n")
                sys.stderr.flush()
                if f.action == "exit":
                    os._exit(FAULT_EXIT)
                os.kill(os.getpid(), signal.SIGSTOP)

    def corrupted(messages: Iterable[Message]) -> Iterator[Message]:
        for msg in messages:
            if msg.kind == TRAIN and any(f.action == "nan" and f.first <= msg.step <= f.last for f in mine):
                msg.h = msg.h * float("nan")
            yield msg

    nan = any(f.action == "nan" for f in mine)
    return after_step, (corrupted if nan else None)


StreamFilter = Callable[[Iterable[Message]], Iterable[Message]]
