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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeflow.checkpoint import CheckpointStore, rng_state, save_model, set_rng_state
from pipeflow.config import Config
from pipeflow.errors import UserError
from pipeflow.evaluate import evaluate
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, optimizer_states
from pipeflow.parts import whole_model_part
from pipeflow.runlog import RunLog, check_run_dir, check_same_run, finished_summary, prepare_run_dir
from pipeflow.schedules import active_parts
from pipeflow.build import Run, build_run, resolve_device


@dataclass
class Phase:
    name: str  # "by_parts", "finetune" or "e2e"
    epochs: int
    schedule: str
    trainers: list[PartTrainer]
    seconds: float = 0.0
    test_bpd: float | None = None
    images: int = 0  # training images this process has seen (its shard of each batch, with DDP)


@dataclass
class Progress:
    """What a run has done so far; enough to draw curves of bits/dim against time."""

    global_step: int = 0
    train_seconds: float = 0.0
    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)


Callback = Callable[[dict], None]


def train_step(trainers: Sequence[PartTrainer], active: Sequence[int],
               x: torch.Tensor) -> list[tuple[int, float, float]]:
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
    by_parts = Phase("by_parts", t.by_parts_epochs, t.schedule,
                     [trainer(p, run.part_lr(k)) for k, p in enumerate(run.parts)])
    finetune = Phase("finetune", t.finetune_epochs, "e2e",
                     [trainer(whole_model_part(run.model), t.finetune_lr or t.lr)])
    return [by_parts, finetune]


CheckpointHook = Callable[[int, int], None]  # (epoch of the phase, batches of it done) -> save a checkpoint


def run_phase(phase: Phase, run: Run, device: torch.device, log: RunLog | None, progress: Progress,
              on_step: Callback | None = None, on_epoch: Callback | None = None,
              shard: Callable[[torch.Tensor], torch.Tensor] | None = None,
              evaluate_fn: Callable[..., list[float]] = evaluate, start: tuple[int, int] = (0, 0),
              checkpoint: CheckpointHook | None = None, after_step: Callable[[int], None] | None = None) -> None:
    """Train ``phase`` for its epochs, evaluating and drawing samples after each.

    ``shard`` picks this process's rows of every batch and ``evaluate_fn`` may pool the
    test set over processes: that is all data-parallel fine-tuning changes here.

    ``start = (epoch, batch)`` resumes the phase at batch ``batch`` of its epoch ``epoch``
    (``progress`` must then hold what the run had done by that point). ``checkpoint`` is
    called with the position to resume from every ``checkpoint.every_steps`` steps and after
    each epoch's evaluation; ``after_step`` with the global step after every step.
    """
    t, every = run.cfg.train, run.cfg.checkpoint.every_steps
    batches, tests = run.train_batches(), run.test_batches()
    n_parts = len(phase.trainers)
    clock = time.perf_counter()

    def flush_time() -> None:  # training seconds so far into phase and progress (checkpoint writes excluded)
        nonlocal clock
        now = time.perf_counter()
        phase.seconds += now - clock
        progress.train_seconds += now - clock
        clock = now

    first_epoch, first_batch = start
    for epoch in range(first_epoch, phase.epochs):
        skip = first_batch if epoch == first_epoch else 0
        clock = time.perf_counter()
        for b, x in enumerate(batches.epoch(progress.epochs_done, start=skip), start=skip):
            x = shard(x) if shard else x
            phase.images += len(x)
            active = active_parts(phase.schedule, n_parts, epoch, progress.global_step, phase.epochs, t.alternate_every)
            step_start = time.perf_counter()
            results = train_step(phase.trainers, active, x.to(device))
            elapsed = time.perf_counter() - step_start
            progress.global_step += 1
            record_base = {"kind": "step", "phase": phase.name, "epoch": progress.epochs_done,
                           "step": progress.global_step, "images_per_s": len(x) / elapsed}
            for k, loss, bpd in results:
                record = {**record_base, "part": k, "loss": loss, "prefix_bpd": bpd}
                if log and phase.trainers[k].steps % t.log_every == 0:  # per part: alternate must not alias
                    log.log({**record, "wall": time.time()})
                if on_step:
                    on_step(record)
            if checkpoint and every and progress.global_step % every == 0 and b + 1 < len(batches):
                flush_time()
                checkpoint(epoch, b + 1)  # at an epoch's end the checkpoint follows the evaluation
                clock = time.perf_counter()
            if after_step:
                after_step(progress.global_step)
        flush_time()
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
                grid = run.model.sample(t.samples, t.temperature, gen)
                log.samples(grid, f"{phase.name}_epoch{progress.epochs_done:03d}")
        if on_epoch:
            on_epoch(record)
        if checkpoint:
            checkpoint(epoch + 1, 0)


def diverged_hint(exc: BaseException, store: CheckpointStore) -> str:
    """``exc``'s message, plus where the last good parameters are."""
    try:
        entries = store.entries()
    except UserError:
        entries = []
    if not entries:
        return f"{exc}; no checkpoint was saved yet"
    newest = entries[-1]
    good = newest["step"] - newest.get("bad_in_a_row", 0)
    return (f"{exc}; the newest checkpoint in {store.dir}, of step {newest['step']}, holds the parameters of step "
            f"{good}, the last good one (a skipped step changes nothing): --resume auto continues from it, "
            "e.g. with a lower train.lr")


def train(cfg: Config, out: str | Path, force: bool = False, on_step: Callback | None = None,
          on_epoch: Callback | None = None, resume: bool = False,
          after_step: Callable[[int], None] | None = None) -> dict:
    """Train as ``cfg`` says, write the run directory ``out`` and return its summary.

    ``resume``: continue the run in ``out`` from its newest checkpoint (or start it, if it has
    none); a run that already finished is returned as it is. Checkpoints go to
    ``out/checkpoints/rank0`` every ``checkpoint.every_steps`` steps and after every epoch.
    """
    wall_start = time.perf_counter()
    out = Path(out)
    # Every check that can refuse the run comes before anything is written to ``out``.
    check_run_dir(out, force=force, resume=resume)
    if resume:
        check_same_run(out, cfg)
        done = finished_summary(out)
        if done is not None:
            return {**done, "already_finished": True}
    run = build_run(cfg)
    device = resolve_device(cfg.train.device)
    run.model.to(device)
    for part in run.parts:
        part.to(device)
    phases = make_phases(run, device)
    progress = Progress()
    store = CheckpointStore(out, 0, cfg.checkpoint.keep)
    state = _load_single_state(store, cfg) if resume else None
    position = (0, 0, 0)  # phase, epoch of the phase, batches of that epoch done
    if state is not None:
        position = _restore_single(state, run, phases, progress, device)
    out = prepare_run_dir(out, force=force, resume=resume)
    if resume:
        store.discard_after(state["step"] if state else 0)
    log = RunLog(out, cfg, metrics_bytes=state["metrics_bytes"] if state else (0 if resume else None))
    if state is None:
        # Data-dependent init of every ActNorm from the first training batch, before any update:
        # a part then starts from the same statistics whatever the schedule.
        first = next(run.train_batches().epoch(0)).to(device)
        with torch.no_grad():
            h = first
            for part in run.parts:
                h = part(h)[0]

    def save(p: int, epoch: int, batch: int) -> None:
        store.save(progress.global_step, phases[p].name, {
            "kind": "single", "world": 1, "config": cfg.to_dict(),
            "model": run.model.state_dict(), "parts": [part.state_dict() for part in run.parts],
            "trainers": [[tr.state_dict() for tr in ph.trainers] for ph in phases],
            "phases": [{"seconds": ph.seconds, "test_bpd": ph.test_bpd, "images": ph.images} for ph in phases],
            "progress": asdict(progress), "position": [p, epoch, batch], "metrics_bytes": log.tell(),
            "rng": rng_state(device),
        }, world=1, kind="single", bad_in_a_row=max(tr.bad_in_a_row for ph in phases for tr in ph.trainers))

    try:
        for p, phase in enumerate(phases):
            if p < position[0] or not phase.epochs:
                continue
            start = (position[1], position[2]) if p == position[0] else (0, 0)
            if phase.name == "finetune" and start == (0, 0) and cfg.train.finetune_optimizer == "carry":
                phase.trainers[0].carry_on_from(optimizer_states(phases[0].trainers))
            run_phase(phase, run, device, log, progress, on_step, on_epoch, start=start,
                      checkpoint=lambda e, b, p=p: save(p, e, b), after_step=after_step)
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_hint(exc, store)) from None
    finally:
        log.close()
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
                             "test_bpd": ph.test_bpd, "images_per_process": ph.images} for ph in phases},
        "history": progress.history,
        "device": str(device),
        "resumed_from_step": state["step"] if state else None,
    }
    log.summary(summary)
    return summary


def _load_single_state(store: CheckpointStore, cfg: Config) -> dict | None:
    entries = store.entries()
    if not entries:
        return None
    newest = entries[-1]
    if newest.get("kind") != "single":
        raise UserError(f"the checkpoints in {store.dir.parent} were written by pipeflow.launch on "
                        f"{newest.get('world')} process(es): resume that run with torchrun ... -m pipeflow.launch "
                        "--resume auto, or pass --force to start afresh")
    return store.load(newest["step"], cfg)


def _restore_single(state: dict, run: Run, phases: list[Phase], progress: Progress,
                    device: torch.device) -> tuple[int, int, int]:
    where = f"checkpoint of step {state['step']}"
    try:
        run.model.load_state_dict(state["model"])
        for part, part_state in zip(run.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)
        for phase, trainer_states, phase_state in zip(phases, state["trainers"], state["phases"], strict=True):
            for trainer, trainer_state in zip(phase.trainers, trainer_states, strict=True):
                trainer.load_state_dict(trainer_state)
            phase.seconds, phase.test_bpd = phase_state["seconds"], phase_state["test_bpd"]
            phase.images = phase_state.get("images", 0)
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        set_rng_state(state["rng"], device)
        p, epoch, batch = state["position"]
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the {where} does not fit this run: {str(exc).splitlines()[0]}") from None
    return p, epoch, batch
