"""Each part's learning rate, found before training by a learning-rate range test (``train.find_lr_steps``).

Parts differ in depth, in where they sit and in what their boundary prior asks, so one rate
does not suit them all (the paper leaves finding each part's rate as a next step). For each
part, on copies of the parts at their initial weights:

    for step i of N:  lr_i = LR_MIN * (LR_MAX / LR_MIN)^(i / (N - 1))
                      one update of the part's truncated objective at lr_i (no warm-up)

on the first N training batches, each fed through the earlier parts at *their* initial
weights. The loss is smoothed (an exponential average, bias-corrected) and the test stops
once it is non-finite or four times its lowest; the rate chosen is a tenth of the one at the
lowest smoothed loss, where the loss still falls steadily. The run's own parts are never
touched, so training starts from the same model, and everything is seeded: the same config
finds the same rates.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from pipeflow.glow.invconv import SingularWeightError
from pipeflow.objective import PartLikelihood, part_objective
from pipeflow.part_trainer import PartTrainer, TrainingDiverged

LR_MIN, LR_MAX = 1e-6, 1e-1
SMOOTHING = 0.8  # of the loss's exponential average
DIVERGED = 4.0  # the test stops once the smoothed loss exceeds this many times its lowest


def range_lrs(steps: int) -> list[float]:
    """``steps`` rates rising exponentially from LR_MIN to LR_MAX."""
    if steps == 1:
        return [LR_MIN]
    return [LR_MIN * (LR_MAX / LR_MIN) ** (i / (steps - 1)) for i in range(steps)]


def pick_lr(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the rate at the lowest smoothed loss (never below LR_MIN)."""
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING ** (i + 1)))
        if smoothed[-1] > DIVERGED * min(smoothed) and min(smoothed) > 0:
            break
    if not smoothed:
        return LR_MIN
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    return max(LR_MIN, lrs[best] / 10)


def range_test(part, inputs: list[tuple[torch.Tensor, torch.Tensor]], cfg, num_dims: int,
               n_bins: int) -> tuple[float, list[float], list[float]]:
    """Train a copy of ``part`` at rising rates on ``inputs``; return the rate chosen, the rates and the losses."""
    test_cfg = dataclasses.replace(cfg, warmup_steps=0, max_bad_steps=1, compile=False)  # a few steps: eager
    trainer = PartTrainer(copy.deepcopy(part), LR_MIN, test_cfg, num_dims, n_bins, name=f"part {part.index}")
    lrs, losses = range_lrs(len(inputs)), []
    for lr, (h, carry) in zip(lrs, inputs):
        trainer.base_lr = lr
        try:
            _, loss, _ = trainer.train_step(h, carry)
        except (TrainingDiverged, SingularWeightError):
            loss = math.inf
        losses.append(loss)
        if not math.isfinite(loss):
            break
    return pick_lr(lrs, losses), lrs[: len(losses)], losses


def find_part_lrs(run, device: torch.device, steps: int) -> list[dict]:
    """Each part's range test (see the module's docstring): ``{"part", "lr", "lrs", "losses"}`` per part."""
    # the run's own parts stay as they are (shared layers stay shared); the copies all on ``device``
    # (on a pipeline stage, the run's other parts wait on the host)
    parts = [part.to(device) for part in copy.deepcopy(run.parts)]
    xs = [x.to(device) for x in run.train_batches().first(steps)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():  # every ActNorm initialises on the first batch, as the run's INIT does
            h = xs[0]
            for part in parts:
                h = PartLikelihood(part)(h)[0]
        inputs = [(x, torch.zeros(len(x), device=device)) for x in xs]
        results = []
        for part in parts:
            lr, lrs, losses = range_test(part, inputs, run.cfg.train, run.num_dims, run.n_bins)
            results.append({"part": part.index, "lr": lr, "lrs": lrs, "losses": losses})
            with torch.no_grad():  # the next part's inputs: this part's output at its initial weights
                outs = [part_objective(PartLikelihood(part), h, carry, run.num_dims, run.n_bins) for h, carry in inputs]
            inputs = [(o.h, o.carry) for o in outs]
    return results
