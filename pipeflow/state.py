"""One run state for every mode, the one checkpoint that holds it, and the one summary made from it.

A checkpoint is one small dict: the run state, the state dicts of the modules and
optimisers this process owns, the averaged weights it evaluates, its RNG and how much of
``metrics.jsonl`` it had written.
What a process owns depends on the mode (every part on one device; its own part on a
pipeline stage; the whole model in fine-tuning), never the schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import time

import torch
from torch import nn

from pipeflow.averaging import WeightAverage
from pipeflow.checkpoint import CheckpointStore, rng_state, set_rng_state
from pipeflow.config import Config
from pipeflow.errors import UserError
from pipeflow.loop import Tally
from pipeflow.runlog import RunLog
from pipeflow.part_trainer import PartTrainer


@dataclass
class RunState:
    """What a run has done so far; enough to continue it and to draw bits/dim against time."""

    step: int = 0  # training steps done, over the whole run
    phase: str = ""  # the phase the run is in (a PhaseName)
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # evaluation records
    records: list[dict] = field(default_factory=list)  # step records held until rank 0 logs them (multi-rank)
    evals: list[dict] = field(default_factory=list)  # this stage's mean prefix bits/dim per epoch (multi-rank)
    tallies: dict[str, Tally] = field(default_factory=dict)  # by phase
    ranks: list[dict] = field(default_factory=list)  # every rank's by-parts figures (multi-rank, rank 0)
    comm: dict[str, int] = field(default_factory=dict)  # bytes moved, by kind (multi-rank)
    part_lrs: list[float] = field(default_factory=list)  # found by train.find_lr_steps (a resumed run keeps them)

    def count_seconds(self, seconds: float) -> None:
        """Training time, as the loop measures it (its ``on_time`` hook)."""
        self.train_seconds += seconds

    def tally(self, phase: str) -> Tally:
        return self.tallies.setdefault(phase, Tally())

    def to_dict(self) -> dict:
        """Plain data (phase names as strings: checkpoints load with ``weights_only``)."""
        return json.loads(json.dumps({**asdict(self), "tallies": {k: asdict(v) for k, v in self.tallies.items()}}))

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**{**d, "tallies": {k: Tally(**v) for k, v in d["tallies"].items()}})


@dataclass
class Checkpointer:
    """Saves and restores this process's share of a run (a component over the stateful objects)."""

    store: CheckpointStore
    cfg: Config
    entry: str  # "train" (one device) or "launch" (torchrun): a checkpoint resumes under its own entry point
    world: int = 1
    stages: int = 1
    device: torch.device = torch.device("cpu")
    metrics_bytes: Callable[[], int] = lambda: 0

    def save(self, state: RunState, modules: Sequence[nn.Module], trainers: Sequence[PartTrainer],
             counters: dict | None = None, average: WeightAverage | None = None) -> None:
        self.store.save(state.step, str(state.phase), {
            "entry": self.entry, "world": self.world, "stages": self.stages, "config": self.cfg.to_dict(),
            "run": state.to_dict(), "modules": [m.state_dict() for m in modules],
            "trainers": [t.state_dict() for t in trainers], "counters": counters,
            "average": average.state_dict() if average is not None else None,
            "metrics_bytes": self.metrics_bytes(), "rng": rng_state(self.device),
        }, entry=self.entry, world=self.world, stages=self.stages,
            bad_in_a_row=max((t.bad_in_a_row for t in trainers), default=0))


def restore(blob: dict, modules: Sequence[nn.Module], trainers: Sequence[PartTrainer],
            device: torch.device, average: WeightAverage | None = None) -> RunState:
    """Load a checkpoint into this process's modules, trainers and averaged weights; return its run state.
    An average the checkpoint lacks (``train.eval_ema`` was off when it was taken) starts afresh."""
    try:
        for module, state in zip(modules, blob["modules"], strict=True):
            module.load_state_dict(state)
        for trainer, state in zip(trainers, blob["trainers"], strict=True):
            trainer.load_state_dict(state)
        if average is not None and blob.get("average") is not None:
            average.load_state_dict(blob["average"])
        state = RunState.from_dict(blob["run"])
        set_rng_state(blob["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the checkpoint of step {blob.get('step')} (rank {blob.get('rank')}) does not fit this run: "
                        f"{str(exc).splitlines()[0]}") from None
    return state


def newest_entry_check(entries: list[dict], entry: str, world: int, stages: int,
                       whose: str = "the checkpoints") -> None:
    """Refuse checkpoints written by the other entry point or by another number of processes or parts."""
    for e in entries:
        if e.get("entry") != entry:
            if entry == "train":
                raise UserError(f"the checkpoints in {e.get('dir', 'this run directory')} were written by "
                                f"pipeflow.launch on {e.get('world')} process(es): resume that run with torchrun ... "
                                "-m pipeflow.launch --resume auto, or pass --force to start afresh")
            raise UserError("the checkpoints in this run directory were written by `pipeflow train` on one device: "
                            "resume them with pipeflow train --resume auto, or pass --force to start afresh")
        if (e.get("world"), e.get("stages")) != (world, stages):
            raise UserError(f"{whose} were written by {e.get('world')} processes running {e.get('stages')} "
                            f"parts, not {world} running {stages}: resume with the same number of processes, or pass "
                            "--force to start afresh")


def summary(state: RunState, cfg: Config, phases: Sequence[Any], test_bpd: float | None, wall_seconds: float,
            device: torch.device, cuts: list[int], parts: int, skipped: int, resumed_from: int | None,
            **extra: Any) -> dict:
    """``summary.json``: the same fields from ``pipeflow train`` and ``pipeflow.launch`` (which adds its own)."""
    return {
        "test_bpd": test_bpd,
        "wall_seconds": wall_seconds,
        "train_seconds": state.train_seconds,
        "steps": state.step,
        "schedule": extra.pop("schedule", cfg.train.schedule),
        "parts": parts,
        "cuts": cuts,
        "skipped_steps": skipped,
        "phases": {ph.name: {"epochs": ph.epochs, "seconds": state.tally(ph.name).seconds, "schedule": ph.schedule,
                             "test_bpd": state.tally(ph.name).test_bpd,
                             "images_per_process": state.tally(ph.name).images} for ph in phases},
        "history": state.history,
        "device": str(device),
        "resumed_from_step": resumed_from,
        **extra,
    }


def is_checkpoint_step(step: int, steps_per_epoch: int, every: int) -> bool:
    """Checkpoints are taken every ``every`` steps and at each epoch's last step."""
    return step % steps_per_epoch == 0 or bool(every and step % every == 0)


def checkpointing(state: RunState, saver: Checkpointer, steps_per_epoch: int, every: int,
                  owned: Callable[[], tuple[Sequence[nn.Module], Sequence[PartTrainer], dict | None]] | None,
                  average: WeightAverage | None = None):
    """The after-step hook of every mode: note the step, and at a checkpoint step save what this
    process owns (``owned()``: its modules, trainers and byte counters; None: nothing to save) and
    the averaged weights it evaluates (``train.eval_ema``)."""
    def stepped(msg) -> None:
        state.step = msg.step
        if owned is not None and is_checkpoint_step(msg.step, steps_per_epoch, every):
            modules, trainers, counters = owned()
            saver.save(state, modules, trainers, counters, average)

    return stepped


def evaluated(state: RunState, log: RunLog | None, phase: str, epoch: int, step: int, means: list[float],
              model: nn.Module | None = None, cfg: Config | None = None) -> dict:
    """Record an evaluation of the whole model: into the history, the log and (given the model and
    ``train.samples``) a sample grid. The same record from every mode; returns it."""
    record = {"kind": "eval", "phase": phase, "epoch": epoch + 1, "test_bpd": means[-1], "test_prefix_bpd": means,
              "train_seconds": state.train_seconds, "step": step}
    if cfg is not None and cfg.train.eval_ema:  # the averaged weights' too (see pipeflow.averaging)
        record["test_bpd_ema"] = state.tally(phase).test_bpd_ema
    if state.tally(phase).test_nonfinite:  # why test_bpd is not finite: how many images overflowed
        record["test_nonfinite"] = state.tally(phase).test_nonfinite
    state.history.append(record)
    state.tally(phase).test_bpd = means[-1]
    if log is not None:
        log.log({**record, "wall": time.time()})
        t = cfg.train if cfg is not None else None
        if model is not None and t is not None and t.samples:
            grid = model.sample(t.samples, t.temperature, torch.Generator().manual_seed(t.seed))
            log.samples(grid, f"{phase}_epoch{epoch + 1:03d}")
    return record
