"""Which parts train on a given step of the by-parts phase.

* ``pipeline``   -- every part on every batch, each on the detached output of the one
  before it: what the multi-rank pipeline does, run on one device.
* ``alternate``  -- the paper's: one part per step, in turns of ``alternate_every`` steps
  (or of one epoch); the parts before it run forward under no_grad, those after are skipped.
* ``sequential`` -- greedy: part 1 for the first 1/P of the epochs, then part 2, ...
  (an ablation; it is known to be unstable).
* ``e2e``        -- the whole model as one part (the baseline).
"""

from __future__ import annotations


def active_parts(schedule: str, parts: int, epoch: int, global_step: int, epochs: int,
                 alternate_every: int) -> list[int]:
    if schedule in ("pipeline", "e2e"):
        return list(range(parts))
    if schedule == "alternate":
        turn = global_step // alternate_every if alternate_every else epoch
        return [turn % parts]
    if schedule == "sequential":
        return [min(epoch * parts // max(epochs, 1), parts - 1)]
    raise ValueError(f"unknown schedule {schedule!r}")
