"""Training on one device: the by-parts phase, then end-to-end fine-tuning.

One device runs exactly what pipeline stage 0 runs (:mod:`pipeflow.loop`), with every part
in its chain and no stage after it:

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeflow.averaging import WeightAverage, weight_average
from pipeflow.build import Run, build_run, resolve_device
from pipeflow.checkpoint import CheckpointStore, save_model
from pipeflow.config import Config
from pipeflow.errors import UserError
from pipeflow.feed import attach_feeds
from pipeflow.lr_find import find_part_lrs
from pipeflow.loop import Chain, DataStream, Hooks, PhaseName, evaluate, run_loop
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, optimizer_states
from pipeflow.parts import whole_model_part
from pipeflow.runlog import RunLog, check_run_dir, check_same_run, finished_summary, prepare_run_dir
from pipeflow.state import Checkpointer, RunState, checkpointing, evaluated, newest_entry_check, restore, summary

Callback = Callable[[dict], None]


@dataclass
class Phase:
    name: PhaseName
    epochs: int
    schedule: str
    trainers: list[PartTrainer]


def make_phases(run: Run, part_lrs: list[float] | None = None) -> list[Phase]:
    """The phases of a one-device run, each with the trainers of its chain (``part_lrs``: found rates)."""
    t = run.cfg.train

    def trainer(part, lr):
        return PartTrainer(part, lr, t, run.num_dims, run.n_bins)

    if t.schedule == "e2e":
        return [Phase(PhaseName.E2E, t.run_epochs, "e2e", [trainer(run.parts[0], t.lr)])]
    by_parts = Phase(PhaseName.BY_PARTS, t.by_parts_epochs, t.schedule,
                     [trainer(p, part_lrs[k] if part_lrs else run.part_lr(k)) for k, p in enumerate(run.parts)])
    attach_feeds(by_parts.trainers[:-1], t.feed_ema)  # every part that feeds another
    whole = trainer(whole_model_part(run.model), t.finetune_lr or t.lr)
    finetune = Phase(PhaseName.FINETUNE, t.finetune_epochs, "e2e", [whole])
    return [by_parts, finetune]


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


def run_phases(phases: list[Phase], state: RunState, stream: DataStream, hooks: Callable[[Phase], Hooks],
               cfg: Config, init: torch.Tensor | None, average: WeightAverage | None = None) -> None:
    """Drive each phase through the loop, from where ``state`` stands; ``init`` starts a fresh run.
    ``average``: the model's averaged weights (``train.eval_ema``), carried through every phase."""
    t = cfg.train
    first_epoch = 0
    for p, phase in enumerate(phases):
        begins_at = first_epoch * stream.steps_per_epoch
        first_epoch += phase.epochs
        if not phase.epochs or state.step > first_epoch * stream.steps_per_epoch or \
                (state.step == first_epoch * stream.steps_per_epoch and state.phase != phase.name):
            continue  # over (or empty): a resumed run starts in the phase its checkpoint was taken in
        if state.phase != phase.name:  # the phase starts now
            if phase.name == PhaseName.FINETUNE and t.finetune_optimizer == "carry":
                phase.trainers[0].carry_on_from(optimizer_states(phases[0].trainers))
            state.phase = phase.name
        chain = Chain(phase.trainers, phase.schedule, phase.epochs, first_epoch - phase.epochs, t.alternate_every,
                      begins_at, average, run_steps=t.run_epochs * stream.steps_per_epoch)
        tally = state.tally(phase.name)
        run_loop(chain, stream.phase(chain.first_epoch, phase.epochs, state.step, init), tally, hooks(phase),
                 phase.name, t.log_every, on_time=state.count_seconds)
        tally.skipped = sum(tr.skipped for tr in phase.trainers)
        init = None


class _OneDevice:
    """The hooks of a one-device run: log, evaluate, draw samples, checkpoint."""

    def __init__(self, run: Run, state: RunState, log: RunLog, saver: Checkpointer, steps_per_epoch: int,
                 on_step: Callback | None, on_epoch: Callback | None, after_step: Callable[[int], None] | None,
                 average: WeightAverage | None):
        self.run, self.state, self.log, self.saver, self.spe = run, state, log, saver, steps_per_epoch
        self.average = average
        self.on_step, self.on_epoch, self.after_step = on_step, on_epoch, after_step

    def __call__(self, phase: Phase) -> Hooks:
        run = self.run
        owned = lambda: ([run.model, *run.parts], phase.trainers, None)  # noqa: E731
        stepped = checkpointing(self.state, self.saver, self.spe, run.cfg.checkpoint.every_steps, owned, self.average)

        def on_eval(msg, means):
            record = evaluated(self.state, self.log, phase.name, msg.epoch, msg.step, means, run.model, run.cfg)
            if self.on_epoch:
                self.on_epoch(record)

        after = [stepped] + ([lambda msg: self.after_step(msg.step)] if self.after_step else [])
        return Hooks(log=self.log.log, on_step=self.on_step, on_eval=on_eval, after_step=after)


def _resume_point(store: CheckpointStore, cfg: Config) -> dict | None:
    entries = store.entries()
    if not entries:
        return None
    newest_entry_check([{**entries[-1], "dir": store.dir.parent}], "train", 1, 1)
    return store.load(entries[-1]["step"], cfg)


def train(cfg: Config, out: str | Path, force: bool = False, on_step: Callback | None = None,
          on_epoch: Callback | None = None, resume: bool = False,
          after_step: Callable[[int], None] | None = None) -> dict:
    """Train as ``cfg`` says, write the run directory ``out`` and return its summary.

    ``resume``: continue the run in ``out`` from its newest checkpoint (or start it, if it has
    none); a run that already finished is returned as it is. Checkpoints go to
    ``out/checkpoints/rank0`` every ``checkpoint.every_steps`` steps and at every epoch's end.
    """
    wall_start = time.perf_counter()
    out = Path(out)
    check_run_dir(out, force=force, resume=resume)  # every refusal comes before anything is written
    if resume:
        check_same_run(out, cfg)
        done = finished_summary(out)
        if done is not None:
            return {**done, "already_finished": True}
    run = build_run(cfg)
    device = resolve_device(cfg.train.device)
    for module in (run.model, *run.parts):
        module.to(device)
    store = CheckpointStore(out, 0, cfg.checkpoint.keep)
    blob = _resume_point(store, cfg) if resume else None
    found = find_part_lrs(run, device, cfg.train.find_lr_steps) if cfg.train.find_lr_steps and not blob else []
    state = RunState(part_lrs=[f["lr"] for f in found])  # a resumed run keeps the rates it started with
    phases = make_phases(run, blob["run"].get("part_lrs") if blob else state.part_lrs)
    average = weight_average(run.model, cfg.train.eval_ema)
    if blob is not None:
        trainers = next(ph.trainers for ph in phases if ph.name == blob["phase"])
        state = restore(blob, [run.model, *run.parts], trainers, device, average)
    out = prepare_run_dir(out, force=force, resume=resume)
    if resume:
        store.discard_after(state.step)
    log = RunLog(out, cfg, metrics_bytes=blob["metrics_bytes"] if blob else (0 if resume else None))
    for record in found:
        log.log({"kind": "lr_find", **record})
    batches, tests = run.train_batches(), run.test_batches()
    stream = DataStream(lambda e, skip: batches.epoch(e, start=skip), lambda: tests.epoch(0), device, len(batches),
                        bool(cfg.train.eval_ema))
    init = None if blob else next(batches.epoch(0)).to(device)
    saver = Checkpointer(store, cfg, "train", device=device, metrics_bytes=log.tell)
    hooks = _OneDevice(run, state, log, saver, len(batches), on_step, on_epoch, after_step, average)
    try:
        run_phases(phases, state, stream, hooks, cfg, init, average)
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_hint(exc, store)) from None
    finally:
        log.close()
    return _finish(run, phases, state, out, log, device, wall_start, blob)


def _finish(run: Run, phases: list[Phase], state: RunState, out: Path, log: RunLog, device: torch.device,
            wall_start: float, blob: dict | None) -> dict:
    """Save the model, evaluate it once more and write ``summary.json``."""
    if not state.step:
        with torch.no_grad():  # no training step ran: the ActNorms still need their data-dependent init
            run.model.initialize(next(run.train_batches().epoch(0)).to(device))
    save_model(out / "model.pt", run.model, run.cfg, run.n_bins)
    whole = PartTrainer(whole_model_part(run.model), 1.0, run.cfg.train, run.num_dims, run.n_bins)
    final_bpd = evaluate([whole], run.test_batches(), device)[-1]
    result = summary(state, run.cfg, phases, final_bpd, time.perf_counter() - wall_start, device,
                     cuts=[p.steps.start for p in run.parts[1:]], parts=len(run.parts),
                     skipped=sum(state.tally(ph.name).skipped for ph in phases),
                     part_lrs=[tr.base_lr for tr in phases[0].trainers],
                     resumed_from=blob["step"] if blob else None)
    log.summary(result)
    return result
