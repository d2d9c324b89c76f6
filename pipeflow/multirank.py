"""Training on P x R processes: the forward-only pipeline, then end-to-end fine-tuning.

1. **By parts.** Rank r holds part ``r % P`` of replica ``r // P``. Stage 0 reads the
   data; every stage receives the detached latent of the stage before it, trains its own
   part with its own optimiser (the same :class:`PartTrainer` as on one device), and
   sends its detached output on. Nothing travels backwards. With R > 1 the replicas of a
   stage average their gradients (one process group per stage).
2. **Gather.** Each part is broadcast from its owner, so every rank holds the whole flow.
3. **Fine-tune.** Data-parallel (DDP; every rank a shard of every batch) or on rank 0 alone.

Rank 0 writes the run directory; its ``model.pt`` loads alone in one process.

Checkpoints (see :mod:`pipeflow.checkpoint`): during the by-parts phase every rank saves its
part, optimiser, report and RNG state every ``checkpoint.every_steps`` steps and at each
epoch's last step, in ``out/checkpoints/rank{r}``; during fine-tuning rank 0 saves the whole
model and optimiser (the DDP replicas are identical). With ``resume`` the ranks exchange
their manifests and continue from rank 0's newest fine-tuning checkpoint, or else from the
newest by-parts step that every rank has saved.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeflow.checkpoint import CheckpointStore, rng_state, save_model, set_rng_state
from pipeflow.config import Config
from pipeflow.data import dataset_shape, load_dataset, n_bins
from pipeflow.distributed.collectives import (agree, broadcast_object, broadcast_tensors, gather_all, gather_to_rank0,
                                              gradient_averager, guard, sum_across)
from pipeflow.distributed.pipeline import StageReport, data_messages, inbox_messages, run_stage
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import TRAIN, Counters, Inbox, Message, Outbox, open_links
from pipeflow.errors import UserError
from pipeflow.evaluate import evaluate, evaluation_sums
from pipeflow.glow.model import is_initialized
from pipeflow.objective import part_objective
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, optimizer_states
from pipeflow.parts import whole_model_part
from pipeflow.runlog import RunLog, check_run_dir, check_same_run, finished_summary, prepare_run_dir
from pipeflow.build import Run, build_model, build_parts
from pipeflow.train import Phase, Progress, diverged_hint, run_phase


FINETUNE_PHASES = ("finetune", "e2e")
FAULT_EXIT = 43  # the status of a process that an injected fault ended


@dataclass(frozen=True)
class Fault:
    """A failure to inject, for tests (``pipeflow.launch`` builds these from PIPEFLOW_TEST_FAULT).

    ``exit``: the rank ends at once (``os._exit``) after its step ``first`` (checkpoint saved);
    ``stop``: it stops itself (SIGSTOP), a silent peer; ``nan``: its input for steps
    ``first..last`` of the by-parts phase becomes NaN.
    """

    action: str
    rank: int
    first: int
    last: int


@dataclass
class RankContext:
    topo: Topology
    device: torch.device
    bandwidth: float = 0.0  # bytes/s to pace forward sends with (0: unpaced)
    faults: tuple[Fault, ...] = ()

    def after_step(self, step: int) -> None:
        for f in self.faults:
            if f.rank == self.topo.rank and f.first == step and f.action in ("exit", "stop"):
                sys.stderr.write(f"[rank {self.topo.rank}] injected fault: {f.action} after step {step}\n")
                sys.stderr.flush()
                if f.action == "exit":
                    os._exit(FAULT_EXIT)
                os.kill(os.getpid(), signal.SIGSTOP)

    def corrupt(self, step: int) -> bool:
        return any(f.action == "nan" and f.rank == self.topo.rank and f.first <= step <= f.last for f in self.faults)


def _agreed(error: UserError | None, device: torch.device, what: str) -> None:
    """Stop every rank together, with the same kind of error, if any rank failed ``what``."""
    if not agree(error is None, device):
        raise error or UserError(f"{what} failed on another rank (see its message)")


def _rows(x: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """The ``index``-th of ``count`` equal contiguous slices of a batch."""
    n = len(x) // count
    return x[index * n : (index + 1) * n]


def _load_data(run: Run, device: torch.device) -> None:
    error = None
    if run.data is None:
        try:
            run.data = load_dataset(run.cfg.data)
        except UserError as exc:
            error = exc
    _agreed(error, device, "loading the data")


# --- checkpoints ---------------------------------------------------------------------------------


def is_checkpoint_step(step: int, steps_per_epoch: int, every: int) -> bool:
    """By-parts checkpoints: every ``every`` steps and at each epoch's last step."""
    return step % steps_per_epoch == 0 or bool(every and step % every == 0)


def pipeline_skew(topo: Topology, in_flight: int) -> int:
    """How many steps stage 0 may have saved beyond the last stage.

    A stage checkpoints a step after queueing its output; it blocks when ``in_flight``
    messages wait and its sender thread holds one more that the next stage has not yet asked
    for, while that stage may be one step into its own: ``in_flight + 2`` per link, plus one
    for safety, plus one when stage replicas (R > 1) may be a step apart.
    """
    return (topo.stages - 1) * (in_flight + 3) + (1 if topo.replicas > 1 else 0)


def check_keep(cfg: Config, topo: Topology, steps_per_epoch: int) -> None:
    """Refuse a ``checkpoint.keep`` too small for the newest common step to stay on every rank's disk."""
    t, c = cfg.train, cfg.checkpoint
    if topo.stages < 2 or not t.by_parts_epochs:
        return
    skew = pipeline_skew(topo, cfg.distributed.in_flight)
    total = t.by_parts_epochs * steps_per_epoch
    steps = [s for s in range(1, total + 1) if is_checkpoint_step(s, steps_per_epoch, c.every_steps)]
    # The last stage stands somewhere after its newest checkpoint steps[j] and before steps[j + 1];
    # stage 0 may then have saved every checkpoint up to (steps[j + 1] - 1) + skew, and must still
    # hold steps[j]: it keeps that many newer ones, plus steps[j] itself.
    most = max((bisect_right(steps, steps[j + 1] - 1 + skew) - (j + 1) for j in range(len(steps) - 1)), default=0)
    if c.keep < most + 1:
        raise UserError(
            f"checkpoint.keep = {c.keep} is too few for {topo.stages} pipeline stages: stage 0 may have saved "
            f"{skew} steps more than stage {topo.stages - 1} (distributed.in_flight = {cfg.distributed.in_flight}), "
            f"and {most} checkpoints (every {c.every_steps or steps_per_epoch} steps and at each epoch's end) can "
            f"fall in that span, so the newest step that every rank has saved could be deleted; "
            f"set checkpoint.keep = {most + 1} or more, or raise checkpoint.every_steps")


def plan_resume(manifests: list[list[dict]], topo: Topology) -> tuple[str, int] | None:
    """Where to resume from, given every rank's manifest: ``(phase, step)`` or None (from scratch)."""
    for r, entries in enumerate(manifests):
        for e in entries:
            if e.get("kind") == "single":
                raise UserError("the checkpoints in this run directory were written by `pipeflow train` on one device: "
                                "resume them with pipeflow train --resume auto, or pass --force to start afresh")
            if (e.get("world"), e.get("stages")) != (topo.world, topo.stages):
                raise UserError(f"the checkpoints of rank {r} were written by {e.get('world')} processes running "
                                f"{e.get('stages')} parts, not {topo.world} running {topo.stages}: resume with the "
                                "same number of processes, or pass --force to start afresh")
    finetune = [e["step"] for e in manifests[0] if e["phase"] in FINETUNE_PHASES]
    if finetune:
        return "finetune", max(finetune)
    by_parts = [{e["step"] for e in entries if e["phase"] == "by_parts"} for entries in manifests]
    if not all(by_parts):
        return None  # some rank never saved a step: nothing is common, start afresh
    common = set.intersection(*by_parts)
    if not common:
        held = "; ".join(f"rank {r}: {', '.join(map(str, sorted(s)))}" for r, s in enumerate(by_parts))
        raise UserError(f"no step is saved by every rank ({held}); raise checkpoint.keep, "
                        "or pass --force to start afresh")
    return "by_parts", max(common)


def _corrupted(messages: Iterable[Message], ctx: RankContext) -> Iterator[Message]:
    """Test faults: NaN inputs on the chosen steps."""
    for msg in messages:
        if msg.kind == TRAIN and ctx.corrupt(msg.step):
            msg.h = msg.h * float("nan")
        yield msg


# --- the three stages of a run -------------------------------------------------------------------


def by_parts_phase(run: Run, ctx: RankContext, counters: Counters, on_eval=None, state: dict | None = None,
                   store: CheckpointStore | None = None, log: RunLog | None = None,
                   steps_per_epoch: int = 0) -> tuple[StageReport, PartTrainer]:
    cfg, topo, device = run.cfg, ctx.topo, ctx.device
    t = cfg.train
    part = run.parts[topo.stage]
    groups = [dist.new_group(topo.stage_ranks(s)) for s in range(topo.stages)] if topo.replicas > 1 else None
    grad_hook = gradient_averager(groups[topo.stage], topo.replicas) if groups else None
    stage_agree = (lambda ok: agree(ok, device, groups[topo.stage])) if groups else None
    trainer = PartTrainer(part, run.part_lr(topo.stage), t, run.num_dims, run.n_bins, grad_hook=grad_hook,
                          name=f"part {topo.stage} (rank {topo.rank})", agree=stage_agree)
    report = StageReport(topo.rank, topo.stage, topo.replica)
    start_step = 0
    if state is not None:
        try:
            part.load_state_dict(state["part"])
            trainer.load_state_dict(state["trainer"])
            report = StageReport(**state["report"])
            for key, value in state["counters"].items():
                setattr(counters, key, value)
            set_rng_state(state["rng"], device)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"rank {topo.rank}'s checkpoint of step {state['step']} does not fit this run: "
                            f"{str(exc).splitlines()[0]}") from None
        if grad_hook is not None:
            grad_hook.bytes = state.get("allreduce_bytes", 0)
        start_step = state["step"]
    open_links(topo.rank, None if topo.is_first else topo.prev_rank, None if topo.is_last else topo.next_rank,
               device, cfg.distributed.timeout_s)
    if topo.is_first:
        batches = run.train_batches()
        tests = run.test_batches() if topo.replica == 0 else None
        messages = data_messages(
            t.by_parts_epochs,
            lambda e, skip=0: (_rows(x, topo.replica, topo.replicas) for x in batches.epoch(e, start=skip)),
            (lambda: tests.epoch(0)) if tests else None,
            # every replica initialises its ActNorms from the whole first batch, as on one device
            None if start_step else next(batches.epoch(0)),
            device, start_step=start_step, steps_per_epoch=steps_per_epoch,
        )
    else:
        messages = inbox_messages(Inbox(topo.rank, topo.prev_rank, part.in_shape, device, cfg.distributed.timeout_s))
    if any(f.action == "nan" for f in ctx.faults):
        messages = _corrupted(messages, ctx)
    outbox = None
    if not topo.is_last:
        outbox = Outbox(topo.rank, topo.next_rank, part.out_shape, device, cfg.distributed.in_flight,
                        ctx.bandwidth, counters, cfg.distributed.timeout_s)

    def on_train(msg: Message, report: StageReport) -> None:
        if store is not None and is_checkpoint_step(msg.step, steps_per_epoch, cfg.checkpoint.every_steps):
            sent = asdict(counters)
            if outbox is not None:  # a queued message counts: the resumed run starts after it
                sent.update(forward_bytes=outbox.queued_bytes, forward_messages=outbox.queued_messages)
            store.save(msg.step, "by_parts", {
                "kind": "by_parts", "world": topo.world, "stages": topo.stages, "config": cfg.to_dict(),
                "part": part.state_dict(), "trainer": trainer.state_dict(), "report": asdict(report),
                "counters": sent, "allreduce_bytes": grad_hook.bytes if grad_hook else 0,
                "metrics_bytes": log.tell() if log else 0, "rng": rng_state(device),
            }, kind="by_parts", world=topo.world, stages=topo.stages, bad_in_a_row=trainer.bad_in_a_row)
        ctx.after_step(msg.step)

    with guard(f"the gradient average of stage {topo.stage}", cfg.distributed.timeout_s):
        run_stage(report, trainer, messages, outbox, t.log_every, on_eval, on_train)
    report.allreduce_bytes = grad_hook.bytes if grad_hook else 0
    return report, trainer


def gather_optimizer_states(run: Run, topo: Topology, trainer: PartTrainer) -> tuple[dict, int]:
    """Every part's optimiser state, broadcast from replica 0's owner of it, on every rank.

    Fine-tuning carries these moments on (``train.finetune_optimizer = "carry"``), as on one
    device. A state's tensors shaped like the parameter travel on the device; its scalars
    (Adam's ``step``) travel as numbers. Returns the states by parameter and the bytes moved.
    """
    def describe(state: dict) -> dict:  # key -> (value, dtype) for a scalar, None for a tensor to broadcast
        return {k: (v.item(), str(v.dtype).removeprefix("torch.")) if v.dim() == 0 else None for k, v in state.items()}

    states, moved = {}, 0
    for s, part in enumerate(run.parts):
        params = [p for p in part.parameters() if p.requires_grad]
        owner = topo.rank == s
        own = optimizer_states([trainer]) if owner else {}
        layout = broadcast_object([describe(own[p]) if p in own else None for p in params] if owner else None, src=s)
        for p, keys in zip(params, layout):
            if keys is None:  # no state: the parameter never had an update
                continue
            state = {}
            for key, scalar in keys.items():
                if owner:
                    state[key] = own[p][key]
                elif scalar is not None:
                    state[key] = torch.tensor(scalar[0], dtype=getattr(torch, scalar[1]))
                else:
                    state[key] = torch.empty_like(p)
                if scalar is None:
                    moved += broadcast_tensors([state[key]], src=s)
            states[p] = state
    return states, moved


def place_own_part(model: nn.Module, parts: list[nn.Module], stage: int | None, device: torch.device) -> None:
    """Put part ``stage`` (the whole model if None) on ``device``, leaving the other parts' layers on the host.

    Parts share their layers with the model, so the model itself then spans two devices until
    :func:`place_whole_model`: by parts, a device holds one part, not the whole flow.
    """
    if stage is None:
        place_whole_model(model, parts, device)
    else:
        parts[stage].to(device)


def place_whole_model(model: nn.Module, parts: list[nn.Module], device: torch.device) -> None:
    """Put every layer and every part's prior on ``device`` (parts hold priors the model does not)."""
    model.to(device)
    for part in parts:
        part.to(device)


def gather_parts(run: Run, topo: Topology) -> int:
    """Broadcast each part from replica 0's owner of it: afterwards every rank holds the whole flow."""
    moved = 0
    for s, part in enumerate(run.parts):
        moved += broadcast_tensors(part.state_dict().values(), src=s)
    return moved


def train_multirank(cfg: Config, ctx: RankContext, out: str | Path, force: bool = False, on_eval=None,
                    resume: bool = False) -> dict | None:
    """Run on this rank; returns the summary on rank 0 and None elsewhere.

    ``resume``: continue the run in ``out`` from its checkpoints (or start it, if it has none).
    A run that already finished is left as it is; rank 0 returns its summary, marked
    ``"already_finished": True``.
    """
    try:
        return _train_multirank(cfg, ctx, out, force, on_eval, resume)
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_hint(exc, CheckpointStore(out, ctx.topo.rank, cfg.checkpoint.keep))) from None


def _train_multirank(cfg: Config, ctx: RankContext, out: str | Path, force: bool, on_eval, resume: bool) -> dict | None:
    topo, device = ctx.topo, ctx.device
    t = cfg.train
    timeout = cfg.distributed.timeout_s
    wall_start = time.perf_counter()
    error = None
    try:
        check_run_dir(out, force=force, resume=resume)
        if resume and topo.rank == 0:
            check_same_run(out, cfg)
        if t.batch_size % topo.world and cfg.distributed.finetune == "ddp" and (t.finetune_epochs or topo.stages == 1):
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.world} processes "
                            "for data-parallel fine-tuning")
        if t.batch_size % topo.replicas:
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.replicas} replicas")
        shape = dataset_shape(cfg.data)
    except UserError as exc:
        error = exc
    with guard("checking the config", timeout):
        _agreed(error, device, "checking the config")
        dist.barrier()  # every rank has checked the output directory before rank 0 writes into it
        done = broadcast_object(finished_summary(out) if resume and topo.rank == 0 else None)
    if done is not None:
        return {**done, "already_finished": True} if topo.rank == 0 else None

    model = build_model(cfg, shape)
    parts = build_parts(cfg, model, topo.stages) if topo.stages > 1 else [whole_model_part(model)]
    place_own_part(model, parts, topo.stage if topo.stages > 1 else None, device)
    run = Run(cfg, None, model, parts, 0)
    if topo.is_first:
        try:
            run.data = load_dataset(cfg.data)
        except UserError as exc:
            error = exc
    with guard("loading the data", timeout):
        _agreed(error, device, "loading the data")
        # stage 0 knows the data's levels and batches per epoch; tell the others
        known = torch.tensor([n_bins(run.data, cfg.data.n_bits), len(run.train_batches())] if run.data else [0, 0],
                             device=device)
        dist.all_reduce(known, op=dist.ReduceOp.MAX)
    run.n_bins, steps_per_epoch = (int(v) for v in known.tolist())
    by_parts_steps = t.by_parts_epochs * steps_per_epoch if topo.stages > 1 else 0

    # --- where to start: from scratch, or from checkpoints -----------------------------------
    store = CheckpointStore(out, topo.rank, cfg.checkpoint.keep)
    plan, state = None, None
    try:
        check_keep(cfg, topo, steps_per_epoch)
        entries = store.entries() if resume else []
    except UserError as exc:
        error, entries = exc, []
    with guard("agreeing where to resume", timeout):
        _agreed(error, device, "checking the checkpoints")
        if resume:
            try:
                plan = plan_resume(gather_all(entries), topo)
            except UserError as exc:
                error = exc
            _agreed(error, device, "planning the resume")
        if plan is not None:
            phase, step = plan
            if phase == "by_parts" or topo.rank == 0:
                try:
                    state = store.load(step, cfg)
                except UserError as exc:
                    error = exc
            _agreed(error, device, "reading the checkpoints")
            if phase in FINETUNE_PHASES and (cfg.distributed.finetune == "ddp" or topo.stages == 1):
                state = broadcast_object(state)  # every DDP rank continues from rank 0's checkpoint

    log = None
    if topo.rank == 0:
        log = RunLog(prepare_run_dir(out, force=force, resume=resume), cfg,
                     metrics_bytes=state["metrics_bytes"] if state else (0 if resume else None))
    if resume:
        store.discard_after(plan[1] if plan else 0)
    with guard("preparing the run directory", timeout):
        dist.barrier()  # rank 0 has cleared (--force) the directory before any rank saves into it

    progress = Progress()
    counters = Counters()
    summary_phases: dict[str, dict] = {}
    reports = None
    gather_bytes = 0
    resumed_finetune = plan is not None and plan[0] == "finetune"
    carried: dict = {}  # the parts' optimiser states, for fine-tuning to carry on from

    if topo.stages > 1 and t.by_parts_epochs and not resumed_finetune:
        report, trainer = by_parts_phase(run, ctx, counters, on_eval, state, store, log, steps_per_epoch)
        place_whole_model(model, parts, device)
        with guard("gathering the parts", timeout):
            reports = gather_to_rank0({"report": asdict(report), "busy_fraction": report.busy_fraction,
                                       "allreduce_bytes": report.allreduce_bytes, "counters": asdict(counters),
                                       "skipped": trainer.skipped})
            gather_bytes = gather_parts(run, topo)
            if t.finetune_epochs and t.finetune_optimizer == "carry":
                carried, moved = gather_optimizer_states(run, topo, trainer)
                gather_bytes += moved
        progress.epochs_done = t.by_parts_epochs
        progress.global_step = report.steps
        if topo.rank == 0:
            phase_seconds = max(r["report"]["seconds"] for r in reports)
            progress.train_seconds += phase_seconds
            last = reports[topo.stages - 1]["report"]
            for r in reports:
                for record in r["report"]["records"]:
                    log.log(record)
            for i, e in enumerate(last["evals"]):  # ranks 0..P-1 are replica 0's stages, which evaluate
                prefix = [reports[s]["report"]["evals"][i]["prefix_bpd"] for s in range(topo.stages)]
                record = {"kind": "eval", "phase": "by_parts", "epoch": e["epoch"], "test_bpd": e["prefix_bpd"],
                          "test_prefix_bpd": prefix, "train_seconds": e["seconds"], "step": e["step"]}
                progress.history.append(record)
                log.log({**record, "wall": time.time()})
            summary_phases["by_parts"] = {"epochs": t.by_parts_epochs, "seconds": phase_seconds, "schedule": "pipeline",
                                          "test_bpd": last["evals"][-1]["prefix_bpd"] if last["evals"] else None}
    elif resumed_finetune and state is not None:  # (in rank0 mode the other ranks have nothing left to do)
        try:
            model.load_state_dict(state["model"])  # (copied onto the device below)
        except RuntimeError as exc:
            raise UserError(f"the checkpoint of step {state['step']} does not fit this run: "
                            f"{str(exc).splitlines()[0]}") from None
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        reports, summary_phases, gather_bytes = state["reports"], state["summary_phases"], state["gather_bytes"]
        set_rng_state(state["rng"], device)

    place_whole_model(model, parts, device)  # (a no-op unless the by-parts phase was skipped)

    # fine-tuning (or, with one stage, end-to-end data-parallel training from the start)
    ft_epochs = t.finetune_epochs if topo.stages > 1 else t.by_parts_epochs + t.finetune_epochs
    ft_name = "finetune" if topo.stages > 1 else "e2e"
    mode = cfg.distributed.finetune if topo.stages > 1 else "ddp"
    finetune_bytes = 0
    ft_skipped = 0
    if ft_epochs and mode == "rank0":
        with guard("handing over to rank 0", timeout):
            dist.barrier()  # the others leave now: rank 0 fine-tunes alone, with no collective left to wait for
    if ft_epochs and (mode == "ddp" or topo.rank == 0):
        with guard("data-parallel fine-tuning" if mode == "ddp" else "fine-tuning", timeout):
            if mode == "ddp":
                _load_data(run, device)
            elif run.data is None:
                run.data = load_dataset(cfg.data)
            if not resumed_finetune and not is_initialized(model):
                # from scratch (e2e, or no by-parts epochs): every rank initialises its ActNorms from the
                # whole first batch, not from its own shard, so the DDP replicas start equal
                model.initialize(next(run.train_batches().epoch(0)).to(device))
            lr = (t.finetune_lr or t.lr) if topo.stages > 1 else t.lr
            whole = whole_model_part(model)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

                wrap = (lambda m: DDP(m, device_ids=[device.index])) if device.type == "cuda" else DDP
                trainer = PartTrainer(whole, lr, t, run.num_dims, run.n_bins, wrap=wrap, name="whole model",
                                      agree=lambda ok: agree(ok, device))

                def shard(x):
                    return _rows(x, topo.rank, topo.world)

                def evaluate_fn(trainers, tests, dev):
                    totals, count = evaluation_sums(trainers, tests, dev, shard=lambda x: _rows_cover(x, topo))
                    pooled = sum_across([*totals, float(count)], dev)
                    return [v / max(pooled[-1], 1) for v in pooled[:-1]]
            else:
                trainer = PartTrainer(whole, lr, t, run.num_dims, run.n_bins, name="whole model")
                shard, evaluate_fn = None, evaluate
            if carried:
                trainer.carry_on_from(carried)
                carried.clear()  # the trainer holds its own copies now
            phase = Phase(ft_name, ft_epochs, "e2e", [trainer])
            start = (0, 0)
            if resumed_finetune:
                trainer.load_state_dict(state["trainer"])
                phase.seconds, phase.test_bpd = state["phase"]["seconds"], state["phase"]["test_bpd"]
                phase.images = state["phase"].get("images", 0)
                start = tuple(state["position"])
                if mode == "ddp":
                    _rebucket(trainer, run, shard, device)

            def save(epoch: int, batch: int) -> None:
                if topo.rank != 0:
                    return
                store.save(progress.global_step, ft_name, {
                    "kind": ft_name, "world": topo.world, "stages": topo.stages, "config": cfg.to_dict(),
                    "model": model.state_dict(), "trainer": trainer.state_dict(),
                    "phase": {"seconds": phase.seconds, "test_bpd": phase.test_bpd, "images": phase.images},
                    "progress": asdict(progress),
                    "position": [epoch, batch], "reports": reports, "summary_phases": summary_phases,
                    "gather_bytes": gather_bytes, "metrics_bytes": log.tell(), "rng": rng_state(device),
                }, kind=ft_name, world=topo.world, stages=topo.stages, bad_in_a_row=trainer.bad_in_a_row)

            run_phase(phase, run, device, log, progress, shard=shard, evaluate_fn=evaluate_fn, start=start,
                      checkpoint=save, after_step=ctx.after_step)
            if mode == "ddp":
                # what DDP all-reduces: every gradient, every step (before the ring's 2(W-1)/W factor)
                steps = progress.global_step - by_parts_steps
                finetune_bytes = 4 * sum(p.numel() for p in whole.parameters()) * steps
        ft_skipped = trainer.skipped
        summary_phases[ft_name] = {"epochs": ft_epochs, "seconds": phase.seconds,
                                   "schedule": "e2e" if mode == "rank0" else "ddp", "test_bpd": phase.test_bpd,
                                   "images_per_process": phase.images}  # rank 0's: with DDP, its shards
    if mode == "ddp" or not ft_epochs:
        with guard("leaving together", timeout):
            dist.barrier()  # leave together: tearing down while a peer still talks can abort it

    if topo.rank != 0:
        return None
    if log is not None:
        log.close()
    save_model(Path(out) / "model.pt", model, cfg, run.n_bins)
    final_bpd = progress.history[-1]["test_bpd"] if progress.history else None
    if final_bpd is None:
        if run.data is None:
            run.data = load_dataset(cfg.data)
        final_bpd = evaluate([PartTrainer(whole_model_part(model), 1.0, t, run.num_dims, run.n_bins)],
                             run.test_batches(), device)[-1]
    forward = sum(r["counters"]["forward_bytes"] for r in reports) if reports else 0
    backward = sum(r["counters"]["backward_bytes"] for r in reports) if reports else 0
    summary = {
        "test_bpd": final_bpd,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": progress.train_seconds,
        "steps": progress.global_step,
        "schedule": "pipeline" if topo.stages > 1 else "e2e",
        "parts": topo.stages,
        "replicas": topo.replicas,
        "world_size": topo.world,
        "backend": dist.get_backend(),
        "device": str(device),
        "cuts": [p.steps.start for p in parts[1:]],
        "skipped_steps": (sum(r["skipped"] for r in reports) if reports else 0) + ft_skipped,
        "phases": summary_phases,
        "comm": {"forward_bytes": forward, "backward_bytes": backward,
                 "stage_allreduce_bytes": sum(r["allreduce_bytes"] for r in reports) if reports else 0,
                 "gather_bytes": gather_bytes, "finetune_allreduce_bytes": finetune_bytes},
        "ranks": [_rank_summary(r) for r in reports or []],
        "history": progress.history,
        "resumed_from_step": plan[1] if plan else None,
    }
    log.summary(summary)
    return summary


def _rank_summary(r: dict) -> dict:
    """One rank's line in summary.json, from what it reported after the by-parts phase."""
    rep = r["report"]
    return {"rank": rep["rank"], "stage": rep["stage"], "replica": rep["replica"], "steps": rep["steps"],
            "images": rep["images"], "seconds": rep["seconds"], "busy_fraction": r["busy_fraction"],
            "images_per_s": rep["images"] / max(rep["seconds"], 1e-9)}


def _rebucket(trainer: PartTrainer, run: Run, shard, device: torch.device) -> None:
    """One forward and backward pass that changes nothing, so that DDP re-buckets as the interrupted run had.

    DDP reduces every gradient in one bucket on its first step and in buckets made from the
    order gradients arrive ever after. A resumed run's first step would otherwise sum its
    gradients in another layout than the uninterrupted run did (with more than two ranks,
    in another order), and its parameters would differ from it in the last bits.
    """
    x = shard(next(run.train_batches().epoch(0))).to(device)
    out = part_objective(trainer.module, x, torch.zeros(len(x), device=device), run.num_dims, run.n_bins)
    out.loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)


def _rows_cover(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """This rank's rows of a test batch; unlike training shards, the slices cover every row."""
    bounds = [len(x) * i // topo.world for i in range(topo.world + 1)]
    return x[bounds[topo.rank] : bounds[topo.rank + 1]]
