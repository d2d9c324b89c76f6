"""Feeding the next part from an average of this part's weights (``train.feed_ema``).

Trained beside a moving part k, part k+1 chases an input distribution that shifts with every
update of part k (input drift): in the ``pipeline`` and ``alternate`` schedules it ends far
further from end to end than when part k is frozen (``sequential``). An exponential moving
average of part k's weights moves slowly and smoothly, so part k+1 trains on the output of that
average instead:

    theta_ema <- d theta_ema + (1 - d) theta,     d = min(decay, (1 + n) / (10 + n))

after part k's n-th update (the ramp keeps the early average from lagging behind the first,
fast-moving updates). Part k itself still trains on, and is evaluated and glued with, its own
weights: the average only decides what is handed on. Until part k's first update, the part's
own output is handed on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeflow.averaging import fold
from pipeflow.objective import PartLikelihood, PartOutput, hand_on


class EmaFeed:
    """An averaged copy of a part (its layers and prior), whose output the next part trains on."""

    def __init__(self, part: nn.Module, decay: float):
        self.part, self.decay = part, decay
        self.average: nn.Module | None = None  # copied at the first update, once every ActNorm has seen data
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the part's current weights (call after each of its updates)."""
        if self.average is None:
            self.average = copy.deepcopy(self.part).requires_grad_(False)
        else:
            fold(list(self.average.parameters()), [p.detach() for p in self.part.parameters()], self.decay,
                 self.updates)
            for avg, b in zip(self.average.buffers(), self.part.buffers(), strict=True):
                avg.copy_(b)
        self.updates += 1

    @torch.no_grad()
    def hand_on(self, h: torch.Tensor, carry: torch.Tensor) -> PartOutput:
        """The averaged part's output and carried terms (those of the averaged prefix); no prior's terms."""
        return hand_on(PartLikelihood(self.part if self.average is None else self.average), h, carry)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.average = None
        if state["average"] is not None:
            self.average = copy.deepcopy(self.part).requires_grad_(False)
            self.average.load_state_dict(state["average"])


def attach_feeds(trainers, decay: float) -> None:
    """Give every trainer in ``trainers`` (parts whose output feeds another) an averaged feed; 0: none."""
    if decay > 0:
        for trainer in trainers:
            trainer.feed = EmaFeed(trainer.part, decay)
