"""Training on one device: the by-parts phase, then end-to-end fine-tuning.

    for each batch x:                                  (one step)
        h, carry = x, 0
        for part k up to the last active one:
            if k is active: train part k on detach(h)  (its truncated objective)
            else:           run part k under no_grad   (it only feeds a later part)
            h, carry = part k's output, detached

Which parts are active comes from the schedule (:mod:`pipeflow.schedules`). The
``pipeline`` schedule is exactly what the multi-rank pipeline computes, one rank per part.
Fine-tuning and the ``e2e`` baseline are the same loop with one part: the whole model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeflow.config import Config
from pipeflow.evaluate import evaluate
from pipeflow.part_trainer import PartTrainer
from pipeflow.parts import whole_model_part
from pipeflow.runlog import RunLog, prepare_run_dir
from pipeflow.schedules import active_parts
from pipeflow.setup import Run, build_run, resolve_device


@dataclass
class Phase:
    name: str  # "by_parts", "finetune" or "e2e"
    epochs: int
    schedule: str
    trainers: list[PartTrainer]
    seconds: float = 0.0
    test_bpd: float | None = None


@dataclass
class Progress:
    """What a run has done so far; enough to draw curves of bits/dim against time."""

    global_step: int = 0
    train_seconds: float = 0.0
    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)


Callback = Callable[[dict], None]


def train_step(trainers: Sequence[PartTrainer], active: Sequence[int], x: torch.Tensor) -> list[tuple[int, float, float]]:
    """One step of any schedule. Returns ``(part, loss, mean prefix bits/dim)`` for each trained part."""
    h = x
    carry = torch.zeros(len(x), device=x.device)
    results = []
    for k in range(max(active) + 1):
        if k in active:
            out, loss = trainers[k].train_step(h, carry)
            results.append((k, loss, float(out.prefix_bpd.mean())))
        else:
            out = trainers[k].forward(h, carry)
        h, carry = out.h, out.carry
    return results


def make_phases(run: Run, device: torch.device) -> list[Phase]:
    cfg = run.cfg
    t = cfg.train

    def trainer(part, lr):
        return PartTrainer(part, lr, t, run.num_dims, run.n_bins)

    if t.schedule == "e2e":
        return [Phase("e2e", t.by_parts_epochs + t.finetune_epochs, "e2e", [trainer(run.parts[0], t.lr)])]
    by_parts = Phase("by_parts", t.by_parts_epochs, t.schedule, [trainer(p, run.part_lr(k)) for k, p in enumerate(run.parts)])
    finetune = Phase("finetune", t.finetune_epochs, "e2e", [trainer(whole_model_part(run.model), t.finetune_lr or t.lr)])
    return [by_parts, finetune]


def run_phase(phase: Phase, run: Run, device: torch.device, log: RunLog | None, progress: Progress,
              on_step: Callback | None = None, on_epoch: Callback | None = None,
              shard: Callable[[torch.Tensor], torch.Tensor] | None = None,
              evaluate_fn: Callable[..., list[float]] = evaluate) -> None:
    """Train ``phase`` for its epochs, evaluating and drawing samples after each.

    ``shard`` picks this process's rows of every batch and ``evaluate_fn`` may pool the
    test set over processes: that is all data-parallel fine-tuning changes here.
    """
    t = run.cfg.train
    batches, tests = run.train_batches(), run.test_batches()
    n_parts = len(phase.trainers)
    for epoch in range(phase.epochs):
        epoch_start = time.perf_counter()
        for x in batches.epoch(progress.epochs_done):
            x = shard(x) if shard else x
            active = active_parts(phase.schedule, n_parts, epoch, progress.global_step, phase.epochs, t.alternate_every)
            start = time.perf_counter()
            results = train_step(phase.trainers, active, x.to(device))
            elapsed = time.perf_counter() - start
            progress.global_step += 1
            record_base = {"kind": "step", "phase": phase.name, "epoch": progress.epochs_done,
                           "step": progress.global_step, "images_per_s": len(x) / elapsed}
            for k, loss, bpd in results:
                record = {**record_base, "part": k, "loss": loss, "prefix_bpd": bpd}
                if log and phase.trainers[k].steps % t.log_every == 0:  # per part: alternate must not alias
                    log.log({**record, "wall": time.time()})
                if on_step:
                    on_step(record)
        seconds = time.perf_counter() - epoch_start
        phase.seconds += seconds
        progress.train_seconds += seconds
        progress.epochs_done += 1
        bpds = evaluate_fn(phase.trainers, tests, device)
        phase.test_bpd = bpds[-1]
        record = {"kind": "eval", "phase": phase.name, "epoch": progress.epochs_done, "test_bpd": bpds[-1],
                  "test_prefix_bpd": bpds, "train_seconds": progress.train_seconds, "step": progress.global_step}
        progress.history.append(record)
        if log:
            log.log({**record, "wall": time.time()})
            if t.samples:
                gen = torch.Generator().manual_seed(t.seed)
                log.samples(run.model.sample(t.samples, t.temperature, gen), f"{phase.name}_epoch{progress.epochs_done:03d}")
        if on_epoch:
            on_epoch(record)


def train(cfg: Config, out: str | Path, force: bool = False, on_step: Callback | None = None,
          on_epoch: Callback | None = None) -> dict:
    """Train as ``cfg`` says, write the run directory ``out`` and return its summary."""
    wall_start = time.perf_counter()
    out = prepare_run_dir(out, force=force)
    run = build_run(cfg)
    device = resolve_device(cfg.train.device)
    run.model.to(device)
    for part in run.parts:
        part.to(device)
    log = RunLog(out, cfg)
    progress = Progress()
    phases = make_phases(run, device)
    # Data-dependent init of every ActNorm from the first training batch, before any update:
    # a part then starts from the same statistics whatever the schedule.
    first = next(run.train_batches().epoch(0)).to(device)
    with torch.no_grad():
        h = first
        for part in run.parts:
            h = part(h)[0]
    try:
        for phase in phases:
            if phase.epochs:
                run_phase(phase, run, device, log, progress, on_step, on_epoch)
    finally:
        log.close()
    from pipeflow.checkpoint import save_model  # noqa: PLC0415

    save_model(out / "model.pt", run.model, cfg, run.n_bins)
    final_bpd = evaluate([PartTrainer(whole_model_part(run.model), 1.0, cfg.train, run.num_dims, run.n_bins)],
                         run.test_batches(), device)[-1]
    summary = {
        "test_bpd": final_bpd,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": progress.train_seconds,
        "steps": progress.global_step,
        "schedule": cfg.train.schedule,
        "parts": len(run.parts),
        "cuts": [p.steps.start for p in run.parts[1:]],
        "skipped_steps": sum(tr.skipped for ph in phases for tr in ph.trainers),
        "phases": {ph.name: {"epochs": ph.epochs, "seconds": ph.seconds, "schedule": ph.schedule,
                             "test_bpd": ph.test_bpd} for ph in phases},
        "history": progress.history,
        "device": str(device),
    }
    log.summary(summary)
    return summary
