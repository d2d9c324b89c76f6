"""Training on P x R processes: the forward-only pipeline, then end-to-end fine-tuning.

A run on every rank is these named steps:

1. **Agree on the config** -- every rank checks it; one rank's bad input stops them all (exit 2).
2. **Build this rank** -- rank r holds part ``r % P`` of replica ``r // P``; stage 0 reads the data.
3. **Plan the start** -- from scratch, or from the newest step that every rank has saved.
4. **By parts** -- the loop of :mod:`pipeflow.loop` on this rank's part: stage 0 reads the
   data, every later stage the detached latents of the stage before it; nothing travels
   backwards. With R > 1 the replicas of a stage average their gradients.
5. **Gather** -- each part is broadcast from its owner, so every rank holds the whole flow.
6. **Fine-tune** -- the same loop on the whole model: data-parallel (DDP) or on rank 0 alone.
7. **Finish** -- rank 0 writes ``model.pt`` and ``summary.json``; its model loads alone.

Checkpoints (see :mod:`pipeflow.state`): by parts, every rank saves its part, optimiser,
averaged weights and run state every ``checkpoint.every_steps`` steps and at each epoch's last
step; in fine-tuning rank 0 saves the whole model (the DDP replicas are identical).
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pipeflow.build import Run, build_model, build_parts
from pipeflow.checkpoint import CheckpointStore, save_model
from pipeflow.config import Config
from pipeflow.data import dataset_shape, load_dataset, n_bins
from pipeflow.distributed.collectives import (CollectiveWatch, agree, broadcast_object, broadcast_tensors, gather_all,
                                              gather_to_rank0, gradient_averager, guard, sum_across, watched_allreduce)
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import INIT, Counters, Inbox, Links, Message, Outbox, link_groups
from pipeflow.errors import UserError
from pipeflow.feed import attach_feeds
from pipeflow.glow.model import is_initialized
from pipeflow.lr_find import find_part_lrs
from pipeflow.loop import Chain, DataStream, Hooks, PhaseName, Tally, evaluate, inbox_stream, run_loop
from pipeflow.objective import part_objective
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, optimizer_states
from pipeflow.parts import whole_model_part
from pipeflow.averaging import WeightAverage, weight_average
from pipeflow.runlog import RunLog, check_run_dir, check_same_run, finished_summary, prepare_run_dir
from pipeflow.state import (Checkpointer, RunState, checkpointing, evaluated, is_checkpoint_step, newest_entry_check,
                            restore, summary)
from pipeflow.train import Phase, diverged_hint

FINETUNE_PHASES = (PhaseName.FINETUNE, PhaseName.E2E)
T = TypeVar("T")


StreamFilter = Callable[[Iterable[Message]], Iterable[Message]]


@dataclass(frozen=True)
class RankHooks:
    """What a caller may add to a rank's run: after each step, on its stream of messages, as a step of
    the run begins ("gather", "finetune"). The tests inject their faults here."""

    after_step: tuple[Callable[[Message], None], ...] = ()
    stream_filter: StreamFilter | None = None
    moments: tuple[Callable[[str], None], ...] = ()


@dataclass
class RankContext:
    """What the launcher hands a rank: where it stands, its device, and the caller's hooks."""

    topo: Topology
    device: torch.device
    bandwidth: float = 0.0  # bytes/s to pace forward sends with (0: unpaced)
    hooks: RankHooks = field(default_factory=RankHooks)

    def entering(self, moment: str) -> None:
        for hook in self.hooks.moments:
            hook(moment)


@dataclass
class RankRun:
    """Everything one rank holds during a run."""

    cfg: Config
    ctx: RankContext
    out: Path
    run: Run
    steps_per_epoch: int = 0
    state: RunState = field(default_factory=RunState)
    plan: tuple[str, int] | None = None  # where the run resumes: (phase, step)
    blob: dict | None = None  # this rank's checkpoint to resume from
    store: CheckpointStore | None = None
    log: RunLog | None = None
    counters: Counters = field(default_factory=Counters)
    carried: dict = field(default_factory=dict)  # the parts' optimiser states, for fine-tuning to carry on
    watch: CollectiveWatch | None = None  # DDP's all-reduce, which fails out of sight

    @property
    def topo(self) -> Topology:
        return self.ctx.topo

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def timeout(self) -> float:
        return self.cfg.distributed.timeout_s

    @property
    def run_steps(self) -> int:
        """The whole run's steps, by parts and fine-tuning (or DDP end to end) together."""
        return self.cfg.train.run_epochs * self.steps_per_epoch

    def saver(self) -> Checkpointer:
        return Checkpointer(self.store, self.cfg, "launch", self.topo.world, self.topo.stages, self.device,
                            self.log.tell if self.log else (lambda: 0))


def every_rank_agrees(what: str, rr_or_device, timeout: float, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it refused bad input on any rank, every rank stops with exit 2.

    The rank that found the problem raises its own message; the others say where to look.
    """
    device = rr_or_device.device if isinstance(rr_or_device, RankRun) else rr_or_device
    error, result = None, None
    try:
        result = fn()
    except UserError as exc:
        error = exc
    with guard(what, timeout):
        if not agree(error is None, device):
            raise error or UserError(f"{what} failed on another rank (see its message)")
    return result


def _rows(x: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """The ``index``-th of ``count`` equal contiguous slices of a batch."""
    n = len(x) // count
    return x[index * n : (index + 1) * n]


def _rows_cover(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """This rank's rows of a test batch; unlike training shards, the slices cover every row."""
    bounds = [len(x) * i // topo.world for i in range(topo.world + 1)]
    return x[bounds[topo.rank] : bounds[topo.rank + 1]]


# --- checkpoints ---------------------------------------------------------------------------------


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
    if cfg.distributed.finetune == "pipeline" and topo.stages > 1 and t.finetune_epochs and c.keep < 2:
        # each rank saves its own fine-tuning steps: one that dies mid-save leaves the others a step ahead
        raise UserError(f"checkpoint.keep = {c.keep} is too few for pipelined fine-tuning: set it to 2 or more")
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


def plan_resume(manifests: list[list[dict]], topo: Topology,
                finetune_per_rank: bool = False) -> tuple[str, int] | None:
    """Where to resume from, given every rank's manifest: ``(phase, step)`` or None (from scratch).

    Fine-tuning is saved by rank 0 alone (DDP replicas are equal), or with ``finetune_per_rank``
    (pipelined fine-tuning: every rank holds its own part) by every rank, like the by-parts phase.
    """
    for r, entries in enumerate(manifests):
        newest_entry_check(entries, "launch", topo.world, topo.stages, f"the checkpoints of rank {r}")
    finetune = _common_steps(manifests if finetune_per_rank else manifests[:1], FINETUNE_PHASES)
    if finetune:
        return PhaseName.FINETUNE, max(finetune)
    if finetune_per_rank and any(e["phase"] in FINETUNE_PHASES for entries in manifests for e in entries):
        raise UserError("no fine-tuning step is saved by every rank; raise checkpoint.keep (2 or more), "
                        "or pass --force to start afresh")
    by_parts = [{e["step"] for e in entries if e["phase"] == PhaseName.BY_PARTS} for entries in manifests]
    if not all(by_parts):
        return None  # some rank never saved a step: nothing is common, start afresh
    common = set.intersection(*by_parts)
    if not common:
        held = "; ".join(f"rank {r}: {', '.join(map(str, sorted(s)))}" for r, s in enumerate(by_parts))
        raise UserError(f"no step is saved by every rank ({held}); raise checkpoint.keep, "
                        "or pass --force to start afresh")
    return PhaseName.BY_PARTS, max(common)


def _common_steps(manifests: list[list[dict]], phases: tuple[str, ...]) -> set[int]:
    """The steps of ``phases`` that every one of ``manifests`` lists."""
    return set.intersection(*({e["step"] for e in entries if e["phase"] in phases} for entries in manifests))


# --- the steps of a run --------------------------------------------------------------------------


def agree_on_config(cfg: Config, ctx: RankContext, out: Path, force: bool, resume: bool):
    """Every rank checks the config and the output directory; returns the data's shape and, for a
    run that already finished, its summary (on rank 0)."""
    topo, t = ctx.topo, cfg.train

    def check():
        check_run_dir(out, force=force, resume=resume)
        if resume and topo.rank == 0:
            check_same_run(out, cfg)
        ddp_finetune = cfg.distributed.finetune == "ddp" and (t.finetune_epochs or topo.stages == 1)
        if t.batch_size % topo.world and ddp_finetune:
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.world} processes "
                            "for data-parallel fine-tuning")
        if t.batch_size % topo.replicas:
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.replicas} replicas")
        pieces = topo.replicas * cfg.distributed.microbatches
        if cfg.distributed.finetune == "pipeline" and topo.stages > 1 and t.finetune_epochs and t.batch_size % pieces:
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of distributed.microbatches "
                            f"({cfg.distributed.microbatches}) x {topo.replicas} replicas for pipelined fine-tuning")
        d = cfg.distributed
        if d.finetune == "pipeline" and d.pipeline_schedule == "1f1b" and d.microbatches < topo.stages \
                and t.finetune_epochs:  # torch's 1F1B refuses it, but only once fine-tuning starts
            raise UserError(f"distributed.microbatches = {d.microbatches} must be at least the {topo.stages} "
                            "stages for the 1f1b schedule (or distributed.pipeline_schedule = 'gpipe')")
        return dataset_shape(cfg.data)

    shape = every_rank_agrees("checking the config", ctx.device, cfg.distributed.timeout_s, check)
    with guard("checking the config", cfg.distributed.timeout_s):
        dist.barrier()  # every rank has checked the output directory before rank 0 writes into it
        done = broadcast_object(finished_summary(out) if resume and topo.rank == 0 else None)
    return shape, done


def build_rank(cfg: Config, ctx: RankContext, out: Path, shape) -> RankRun:
    """This rank's model and part (on its device: by parts, the part alone), and stage 0's data."""
    topo = ctx.topo
    model = build_model(cfg, shape)
    parts = build_parts(cfg, model, topo.stages) if topo.stages > 1 else [whole_model_part(model)]
    place_own_part(model, parts, topo.stage if topo.stages > 1 else None, ctx.device)
    rr = RankRun(cfg, ctx, out, Run(cfg, None, model, parts, 0))
    if topo.is_first:
        rr.run.data = every_rank_agrees("loading the data", rr, rr.timeout, lambda: load_dataset(cfg.data))
    else:
        every_rank_agrees("loading the data", rr, rr.timeout, lambda: None)
    with guard("loading the data", rr.timeout):  # stage 0 knows the data's levels and batches per epoch
        data = rr.run.data
        known = torch.tensor([n_bins(data, cfg.data.n_bits), len(rr.run.train_batches())] if data else [0, 0],
                             device=ctx.device)
        dist.all_reduce(known, op=dist.ReduceOp.MAX)
    rr.run.n_bins, rr.steps_per_epoch = (int(v) for v in known.tolist())
    return rr


def plan_start(rr: RankRun, force: bool, resume: bool) -> None:
    """From scratch, or from checkpoints: every rank agrees where, then rank 0 prepares the run directory."""
    topo, cfg = rr.topo, rr.cfg
    rr.store = CheckpointStore(rr.out, topo.rank, cfg.checkpoint.keep)

    def entries():
        check_keep(cfg, topo, rr.steps_per_epoch)
        return rr.store.entries() if resume else []

    mine = every_rank_agrees("checking the checkpoints", rr, rr.timeout, entries)
    if resume:
        with guard("agreeing where to resume", rr.timeout):
            manifests = gather_all(mine)
        rr.plan = every_rank_agrees("planning the resume", rr, rr.timeout,
                                    lambda: plan_resume(manifests, topo, _pipelined(rr)))
    if rr.plan is not None:
        phase, step = rr.plan
        mine_to_read = phase == PhaseName.BY_PARTS or topo.rank == 0 or _pipelined(rr)
        rr.blob = every_rank_agrees("reading the checkpoints", rr, rr.timeout,
                                    lambda: rr.store.load(step, cfg) if mine_to_read else None)
        if phase in FINETUNE_PHASES and (cfg.distributed.finetune == "ddp" or topo.stages == 1):
            with guard("reading the checkpoints", rr.timeout):
                rr.blob = broadcast_object(rr.blob)  # every DDP rank continues from rank 0's checkpoint
    if topo.rank == 0:
        metrics = rr.blob["metrics_bytes"] if rr.blob else (0 if resume else None)
        rr.log = RunLog(prepare_run_dir(rr.out, force=force, resume=resume), cfg, metrics_bytes=metrics)
    if resume:
        rr.store.discard_after(rr.plan[1] if rr.plan else 0)
    with guard("preparing the run directory", rr.timeout):
        dist.barrier()  # rank 0 has cleared (--force) the directory before any rank saves into it


def start_replicas_equal(rr: RankRun, group) -> None:
    """Every replica of this rank's stage takes replica 0's weights and buffers: the same seed can build
    different weights (LAPACK), and the same batch initialise different ActNorms (GPU kernels need not be
    deterministic), after which averaged gradients would never bring the replicas together."""
    topo = rr.topo
    with guard(f"the first weights of stage {topo.stage}", rr.timeout):
        broadcast_tensors(rr.run.parts[topo.stage].state_dict().values(), src=topo.stage_ranks(topo.stage)[0],
                          group=group)


def _stage_trainer(rr: RankRun, links: Links):
    """This rank's part trainer; with R > 1 its replicas average their gradients."""
    topo, cfg = rr.topo, rr.cfg
    part = rr.run.parts[topo.stage]
    group = links.stage
    grad_hook = gradient_averager(group, topo.replicas) if group is not None else None
    stage_agree = (lambda ok: agree(ok, rr.device, group)) if group is not None else None
    lr = rr.state.part_lrs[topo.stage] if rr.state.part_lrs else rr.run.part_lr(topo.stage)
    trainer = PartTrainer(part, lr, cfg.train, rr.run.num_dims, rr.run.n_bins,
                          grad_hook=grad_hook, name=f"part {topo.stage} (rank {topo.rank})", agree=stage_agree)
    if not topo.is_last:
        attach_feeds([trainer], cfg.train.feed_ema)  # stage k sends its averaged weights' output
    return part, trainer, grad_hook


def _stage_stream(rr: RankRun, part: nn.Module, links: Links):
    """Stage 0 reads the data (its replica's rows of each batch); every later stage its inbox."""
    topo, t = rr.topo, rr.cfg.train
    if not topo.is_first:
        return inbox_stream(Inbox(topo.rank, topo.prev_rank, part.in_shape, rr.device, rr.timeout, group=links.prev))
    batches = rr.run.train_batches()
    tests = rr.run.test_batches() if topo.replica == 0 else None
    data = DataStream(lambda e, skip: (_rows(x, topo.replica, topo.replicas) for x in batches.epoch(e, start=skip)),
                      (lambda: tests.epoch(0)) if tests else None, rr.device, rr.steps_per_epoch, bool(t.eval_ema))
    # every replica initialises its ActNorms from the whole first batch, as on one device
    init = None if rr.blob else next(batches.epoch(0))
    return data.phase(0, t.by_parts_epochs, rr.state.step, init)


def _after_init(stream: Iterable[Message], then: Callable[[], None]) -> Iterator[Message]:
    """The messages of ``stream``; ``then()`` runs once the loop has handled INIT (when it asks for more)."""
    for msg in stream:
        yield msg
        if msg.kind == INIT:
            then()


def find_lrs(rr: RankRun) -> None:
    """``train.find_lr_steps``: every rank runs every part's range test as one device does (on copies, from
    the initial weights), so that none waits long on another; every stage trains at rank 0's rate for its
    part (the same everywhere, even where a GPU's kernels are not deterministic). A resumed run keeps the
    rates it started with (its run state holds them)."""
    if rr.blob is not None:
        rr.state.part_lrs = list(rr.blob["run"].get("part_lrs", []))
        return
    rr.run.data = every_rank_agrees("loading the data", rr, rr.timeout,
                                    lambda: rr.run.data or load_dataset(rr.cfg.data))
    found = every_rank_agrees("finding the parts' learning rates", rr, rr.timeout,
                              lambda: find_part_lrs(rr.run, rr.device, rr.cfg.train.find_lr_steps))
    with guard("agreeing on the parts' learning rates", rr.timeout):
        rr.state.part_lrs = broadcast_object([f["lr"] for f in found])
    for record in found if rr.log else []:
        rr.log.log({"kind": "lr_find", **record})


def by_parts(rr: RankRun, on_eval: Callable[[dict], None] | None) -> PartTrainer:
    """Train this rank's part in the forward-only pipeline; returns its trainer."""
    topo, cfg, state = rr.topo, rr.cfg, rr.state
    with guard("creating the process groups", rr.timeout):
        links = link_groups(topo, rr.timeout)  # every rank, the same order, on this (the main) thread
    part, trainer, grad_hook = _stage_trainer(rr, links)
    # train.eval_ema: each stage averages its own part, and EVAL_EMA messages carry the averaged latents on
    average = weight_average(part, cfg.train.eval_ema)
    if rr.blob is not None:
        rr.state = state = every_rank_agrees("restoring the checkpoints", rr, rr.timeout,
                                             lambda: restore(rr.blob, [part], [trainer], rr.device, average))
        rr.counters = Counters(**rr.blob["counters"])
        if grad_hook is not None:
            grad_hook.bytes = state.comm.get("stage_allreduce_bytes", 0)
    state.phase = PhaseName.BY_PARTS
    stream = _stage_stream(rr, part, links)
    if rr.ctx.hooks.stream_filter is not None:
        stream = rr.ctx.hooks.stream_filter(stream)
    if links.stage is not None and rr.blob is None:  # R > 1, fresh; outermost: once the loop has handled INIT
        stream = _after_init(stream, lambda: start_replicas_equal(rr, links.stage))
    outbox = None
    if not topo.is_last:
        outbox = Outbox(topo.rank, topo.next_rank, part.out_shape, rr.device, cfg.distributed.in_flight,
                        rr.ctx.bandwidth, rr.counters, rr.timeout, group=links.next)
    tally = state.tally(PhaseName.BY_PARTS)
    hooks = _stage_hooks(rr, part, trainer, grad_hook, outbox, tally, on_eval, average)
    chain = Chain([trainer], "pipeline", cfg.train.by_parts_epochs, average=average, run_steps=rr.run_steps)
    with guard(f"the gradient average of stage {topo.stage}", rr.timeout):
        run_loop(chain, stream, tally, hooks, PhaseName.BY_PARTS, cfg.train.log_every,
                 on_time=state.count_seconds)
    if outbox is not None:
        outbox.close()
    tally.skipped = trainer.skipped
    state.comm["stage_allreduce_bytes"] = grad_hook.bytes if grad_hook else 0
    return trainer


def _stage_hooks(rr: RankRun, part, trainer, grad_hook, outbox, tally: Tally, on_eval,
                 average: WeightAverage | None) -> Hooks:
    topo, state = rr.topo, rr.state
    saver = rr.saver()

    def owned():
        state.comm["stage_allreduce_bytes"] = grad_hook.bytes if grad_hook else 0
        sent = asdict(rr.counters)
        if outbox is not None:  # a queued message counts: the resumed run starts after it
            sent.update(forward_bytes=outbox.queued_bytes, forward_messages=outbox.queued_messages)
        return [part], [trainer], sent

    stepped = checkpointing(state, saver, rr.steps_per_epoch, rr.cfg.checkpoint.every_steps, owned, average)

    def evaluated(msg: Message, means: list[float]) -> None:
        record = {"epoch": msg.epoch + 1, "step": msg.step, "prefix_bpd": means[-1],
                  "prefix_bpd_ema": tally.test_bpd_ema, "seconds": state.train_seconds,
                  "busy_seconds": tally.busy_seconds, "nonfinite": tally.test_nonfinite}
        state.evals.append(record)
        if on_eval:
            on_eval(record)

    def send(msg: Message, out) -> None:
        outbox.send(msg.kind, msg.epoch, msg.step, None if out is None else out.h, None if out is None else out.carry)

    return Hooks(log=lambda r: state.records.append({**r, "busy_fraction": tally.busy_fraction}),
                 on_eval=evaluated, after_step=[stepped, *rr.ctx.hooks.after_step], send=send if outbox else None,
                 record_extra={"replica": topo.replica, "rank": topo.rank})


def gather(rr: RankRun, trainer: PartTrainer) -> None:
    """Every part onto every rank (and its optimiser moments, to carry on); rank 0 takes the reports."""
    topo, cfg = rr.topo, rr.cfg
    rr.ctx.entering("gather")
    if _pipelined(rr):  # each part stays on its rank, with its own moments; only the reports travel
        rr.carried = optimizer_states([trainer]) if cfg.train.finetune_optimizer == "carry" else {}
        with guard("gathering the reports", rr.timeout):
            reports = gather_to_rank0(_report(rr))
        if topo.rank == 0:
            _take_reports(rr, reports, 0)
        return
    place_whole_model(rr.run.model, rr.run.parts, rr.device)
    with guard("gathering the parts", rr.timeout):
        reports = gather_to_rank0(_report(rr))
        moved = gather_parts(rr.run, topo)
        if cfg.train.finetune_epochs and cfg.train.finetune_optimizer == "carry":
            rr.carried, more = gather_optimizer_states(rr.run, topo, trainer)
            moved += more
    if topo.rank == 0:
        _take_reports(rr, reports, moved)


def _report(rr: RankRun) -> dict:
    """What a rank tells rank 0 after the by-parts phase."""
    topo, state = rr.topo, rr.state
    return {"rank": topo.rank, "stage": topo.stage, "replica": topo.replica,
            "tally": asdict(state.tally(PhaseName.BY_PARTS)),
            "records": state.records, "evals": state.evals, "counters": asdict(rr.counters),
            "allreduce_bytes": state.comm.get("stage_allreduce_bytes", 0)}


def _pipelined(rr: RankRun) -> bool:
    """Fine-tuning through the pipelining schedule: the parts are never gathered before it."""
    return rr.cfg.distributed.finetune == "pipeline" and rr.topo.stages > 1 and rr.cfg.train.finetune_epochs > 0


def _take_reports(rr: RankRun, reports: list[dict], gather_bytes: int) -> None:
    """Rank 0 logs every rank's step records and the evaluations, and keeps the by-parts figures."""
    state, stages = rr.state, rr.topo.stages
    for r in reports:
        for record in r["records"]:
            rr.log.log(record)
    state.records, state.evals = [], []
    for i, e in enumerate(reports[stages - 1]["evals"]):  # ranks 0..P-1 are replica 0's stages: they evaluate
        record = {"kind": "eval", "phase": PhaseName.BY_PARTS, "epoch": e["epoch"], "test_bpd": e["prefix_bpd"],
                  "test_prefix_bpd": [reports[s]["evals"][i]["prefix_bpd"] for s in range(stages)],
                  "train_seconds": e["seconds"], "step": e["step"]}
        if e.get("prefix_bpd_ema") is not None:  # train.eval_ema: the averaged glued flow's, as one device records it
            record["test_bpd_ema"] = e["prefix_bpd_ema"]
        if e.get("nonfinite"):  # as one device records it
            record["test_nonfinite"] = e["nonfinite"]
        state.history.append(record)
        rr.log.log({**record, "wall": time.time()})
    tally = state.tally(PhaseName.BY_PARTS)
    tally.seconds = max(r["tally"]["seconds"] for r in reports)
    tally.test_bpd = reports[stages - 1]["tally"]["test_bpd"]
    tally.test_bpd_ema = reports[stages - 1]["tally"]["test_bpd_ema"]
    tally.skipped = sum(r["tally"]["skipped"] for r in reports if r["replica"] == 0)  # replicas skip together
    state.train_seconds = tally.seconds
    state.ranks = [_rank_summary(r) for r in reports]
    state.comm = {"forward_bytes": sum(r["counters"]["forward_bytes"] for r in reports),
                  "backward_bytes": sum(r["counters"]["backward_bytes"] for r in reports),
                  "stage_allreduce_bytes": sum(r["allreduce_bytes"] for r in reports),
                  "gather_bytes": gather_bytes, "finetune_allreduce_bytes": 0,
                  "forward_paced_seconds": sum(r["counters"]["paced_seconds"] for r in reports)}


def _rank_summary(r: dict) -> dict:
    """One rank's line in summary.json, from what it reported after the by-parts phase."""
    t = r["tally"]
    return {"rank": r["rank"], "stage": r["stage"], "replica": r["replica"], "steps": t["steps"],
            "images": t["images"], "seconds": t["seconds"], "busy_fraction": Tally(**t).busy_fraction,
            "images_per_s": t["images"] / max(t["seconds"], 1e-9)}


def _finetune_phase(rr: RankRun) -> Phase:
    """Fine-tuning after the parts, or (one stage) data-parallel end-to-end training from the start."""
    t, topo = rr.cfg.train, rr.topo
    if topo.stages == 1:
        return Phase(PhaseName.E2E, t.run_epochs, "ddp", [])
    schedule = {"rank0": "e2e", "ddp": "ddp", "pipeline": rr.cfg.distributed.pipeline_schedule}
    return Phase(PhaseName.FINETUNE, t.finetune_epochs, schedule[rr.cfg.distributed.finetune], [])


def _whole_trainer(rr: RankRun, ddp: bool) -> PartTrainer:
    t, topo, device = rr.cfg.train, rr.topo, rr.device
    lr = (t.finetune_lr or t.lr) if topo.stages > 1 else t.lr
    whole = whole_model_part(rr.run.model)
    if not ddp:
        return PartTrainer(whole, lr, t, rr.run.num_dims, rr.run.n_bins, name="whole model")
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    def wrap(module):
        ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(rr.watch, watched_allreduce)
        return ddp

    return PartTrainer(whole, lr, t, rr.run.num_dims, rr.run.n_bins, wrap=wrap, name="whole model",
                       agree=lambda ok: agree(ok, device))


def finetune(rr: RankRun, phase: Phase) -> None:
    """The glued flow end to end: every rank a shard of each batch (DDP), or rank 0 alone."""
    topo, cfg, state = rr.topo, rr.cfg, rr.state
    rr.ctx.entering("finetune")
    if _pipelined(rr):
        from pipeflow.pipelined_finetune import pipelined_finetune  # noqa: PLC0415

        with guard("pipelined fine-tuning", rr.timeout):
            return pipelined_finetune(rr, phase)
    ddp = phase.schedule == "ddp"
    if not ddp:
        with guard("handing over to rank 0", rr.timeout):
            dist.barrier()  # the others leave now: rank 0 fine-tunes alone, with no collective left to wait for
        if topo.rank != 0:
            return
    rr.watch = CollectiveWatch(topo.world, rr.ctx.bandwidth)  # --bandwidth paces the all-reduce too
    with guard("data-parallel fine-tuning" if ddp else "fine-tuning", rr.timeout, rr.watch):
        if ddp:
            rr.run.data = every_rank_agrees("loading the data", rr, rr.timeout,
                                            lambda: rr.run.data or load_dataset(cfg.data))
        elif rr.run.data is None:
            rr.run.data = load_dataset(cfg.data)
        resumed = rr.blob is not None and rr.plan[0] in FINETUNE_PHASES
        if not resumed and not is_initialized(rr.run.model):
            # from scratch (e2e, or no by-parts epochs): every rank initialises its ActNorms from the
            # whole first batch, not from its own shard, so the DDP replicas start equal
            rr.run.model.initialize(next(rr.run.train_batches().epoch(0)).to(rr.device))
        trainer = _whole_trainer(rr, ddp)
        if rr.carried:
            trainer.carry_on_from(rr.carried)
            rr.carried.clear()  # the trainer holds its own copies now
        average = weight_average(rr.run.model, cfg.train.eval_ema)  # the phase's own, from its first step
        if resumed:
            def restored():
                return restore(rr.blob, [rr.run.model], [trainer], rr.device, average)

            rr.state = state = every_rank_agrees("restoring the checkpoint", rr, rr.timeout, restored) if ddp \
                else restored()
            if ddp:
                _rebucket(trainer, rr.run, lambda x: _rows(x, topo.rank, topo.world), rr.device)
        state.phase = phase.name
        _finetune_loop(rr, phase, trainer, ddp, average)
        state.tally(phase.name).skipped = trainer.skipped
        if ddp:  # what DDP all-reduces: every gradient, every step (before the ring's 2(W-1)/W factor)
            steps = state.step - (cfg.train.by_parts_epochs * rr.steps_per_epoch if topo.stages > 1 else 0)
            state.comm["finetune_allreduce_bytes"] = 4 * sum(p.numel() for p in trainer.params) * steps
            # how long --bandwidth held rank 0's buckets back (this attempt's, after a resume)
            state.comm["finetune_paced_seconds"] = rr.watch.paced_seconds


def _finetune_loop(rr: RankRun, phase: Phase, trainer: PartTrainer, ddp: bool, average: WeightAverage | None) -> None:
    topo, cfg, state = rr.topo, rr.cfg, rr.state
    batches, tests = rr.run.train_batches(), rr.run.test_batches()
    shard = (lambda x: _rows(x, topo.rank, topo.world)) if ddp else (lambda x: x)
    cover = (lambda x: _rows_cover(x, topo)) if ddp else (lambda x: x)
    data = DataStream(lambda e, skip: (shard(x) for x in batches.epoch(e, start=skip)),
                      lambda: (cover(x) for x in tests.epoch(0)), rr.device, rr.steps_per_epoch,
                      bool(cfg.train.eval_ema))
    first_epoch = cfg.train.by_parts_epochs if topo.stages > 1 else 0
    owned = (lambda: ([rr.run.model], [trainer], None)) if topo.rank == 0 else None  # the DDP replicas are equal
    stepped = checkpointing(state, rr.saver(), rr.steps_per_epoch, cfg.checkpoint.every_steps, owned, average)

    def pool(sums: list[float], count: int) -> tuple[list[float], int]:
        pooled = sum_across([*sums, float(count)], rr.device)
        return pooled[:-1], int(pooled[-1])

    def on_eval(msg: Message, means: list[float]) -> None:
        evaluated(state, rr.log, phase.name, msg.epoch, msg.step, means, rr.run.model, cfg)

    hooks = Hooks(log=rr.log.log if rr.log else None, on_eval=on_eval,
                  after_step=[stepped, *rr.ctx.hooks.after_step], pool=pool if ddp else None)
    chain = Chain([trainer], "e2e", phase.epochs, first_epoch, 0, first_epoch * rr.steps_per_epoch, average,
                  run_steps=rr.run_steps)
    run_loop(chain, data.phase(first_epoch, phase.epochs, state.step), state.tally(phase.name), hooks, phase.name,
             cfg.train.log_every, on_time=state.count_seconds)


def finish(rr: RankRun, phases: list[Phase], wall_start: float) -> dict | None:
    """Rank 0 writes ``model.pt`` and ``summary.json``; returns the summary there, None elsewhere."""
    topo, cfg, state = rr.topo, rr.cfg, rr.state
    if topo.rank != 0:
        return None
    rr.log.close()
    save_model(rr.out / "model.pt", rr.run.model, cfg, rr.run.n_bins)
    final_bpd = state.history[-1]["test_bpd"] if state.history else None
    if final_bpd is None:
        rr.run.data = rr.run.data or load_dataset(cfg.data)
        whole = PartTrainer(whole_model_part(rr.run.model), 1.0, cfg.train, rr.run.num_dims, rr.run.n_bins)
        final_bpd = evaluate([whole], rr.run.test_batches(), rr.device)[-1]
    comm = {"forward_bytes": 0, "backward_bytes": 0, "stage_allreduce_bytes": 0, "gather_bytes": 0,
            "finetune_allreduce_bytes": 0, "forward_paced_seconds": 0.0, "finetune_paced_seconds": 0.0, **state.comm}
    result = summary(state, cfg, [ph for ph in phases if ph.epochs], final_bpd, time.perf_counter() - wall_start,
                     rr.device, cuts=[p.steps.start for p in rr.run.parts[1:]], parts=topo.stages,
                     skipped=sum(state.tally(ph.name).skipped for ph in phases),
                     resumed_from=rr.plan[1] if rr.plan else None,
                     schedule="pipeline" if topo.stages > 1 else "e2e", replicas=topo.replicas,
                     world_size=topo.world, backend=dist.get_backend(), comm=comm, ranks=state.ranks,
                     part_lrs=state.part_lrs or [rr.run.part_lr(k) for k in range(topo.stages)])
    rr.log.summary(result)
    return result


def train_multirank(cfg: Config, ctx: RankContext, out: str | Path, force: bool = False, on_eval=None,
                    resume: bool = False) -> dict | None:
    """Run on this rank; returns the summary on rank 0 and None elsewhere.

    ``resume``: continue the run in ``out`` from its checkpoints (or start it, if it has none).
    A run that already finished is left as it is; rank 0 returns its summary, marked
    ``"already_finished": True``.
    """
    try:
        return _train_multirank(cfg, ctx, Path(out), force, on_eval, resume)
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_hint(exc, CheckpointStore(out, ctx.topo.rank, cfg.checkpoint.keep))) from None


def _train_multirank(cfg: Config, ctx: RankContext, out: Path, force: bool, on_eval, resume: bool) -> dict | None:
    wall_start = time.perf_counter()
    shape, done = agree_on_config(cfg, ctx, out, force, resume)
    if done is not None:
        return {**done, "already_finished": True} if ctx.topo.rank == 0 else None
    rr = build_rank(cfg, ctx, out, shape)
    plan_start(rr, force, resume)
    phases = [_finetune_phase(rr)]
    if rr.topo.stages > 1:
        phases.insert(0, Phase(PhaseName.BY_PARTS, cfg.train.by_parts_epochs, "pipeline", []))
        if cfg.train.by_parts_epochs and not (rr.plan and rr.plan[0] in FINETUNE_PHASES):
            if cfg.train.find_lr_steps:
                find_lrs(rr)
            trainer = by_parts(rr, on_eval)
            gather(rr, trainer)
    if not _pipelined(rr):
        place_whole_model(rr.run.model, rr.run.parts, rr.device)  # (a no-op unless the by-parts phase was skipped)
    if phases[-1].epochs:
        finetune(rr, phases[-1])
    if phases[-1].schedule == "ddp" or not phases[-1].epochs:
        with guard("leaving together", rr.timeout):
            dist.barrier()  # leave together: tearing down while a peer still talks can abort it
    return finish(rr, phases, wall_start)


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

