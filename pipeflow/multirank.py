"""Training on P x R processes: the forward-only pipeline, then end-to-end fine-tuning.

1. **By parts.** Rank r holds part ``r % P`` of replica ``r // P``. Stage 0 reads the
   data; every stage receives the detached latent of the stage before it, trains its own
   part with its own optimiser (the same :class:`PartTrainer` as on one device), and
   sends its detached output on. Nothing travels backwards. With R > 1 the replicas of a
   stage average their gradients (one process group per stage).
2. **Gather.** Each part is broadcast from its owner, so every rank holds the whole flow.
3. **Fine-tune.** Data-parallel (DDP; every rank a shard of every batch) or on rank 0 alone.

Rank 0 writes the run directory; its ``model.pt`` loads alone in one process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeflow.checkpoint import save_model
from pipeflow.config import Config
from pipeflow.data import dataset_shape, load_dataset, n_bins
from pipeflow.distributed.collectives import agree, broadcast_tensors, gather_to_rank0, gradient_averager, sum_across
from pipeflow.distributed.pipeline import StageReport, data_messages, inbox_messages, run_stage
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import Counters, Inbox, Outbox
from pipeflow.errors import UserError
from pipeflow.evaluate import evaluate, evaluation_sums
from pipeflow.part_trainer import PartTrainer
from pipeflow.parts import whole_model_part
from pipeflow.runlog import RunLog, check_run_dir, prepare_run_dir
from pipeflow.setup import Run, build_model, build_parts
from pipeflow.train import Phase, Progress, run_phase


@dataclass
class RankContext:
    topo: Topology
    device: torch.device
    bandwidth: float = 0.0  # bytes/s to pace forward sends with (0: unpaced)


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


def by_parts_phase(run: Run, ctx: RankContext, counters: Counters, on_eval=None) -> tuple[StageReport, PartTrainer]:
    cfg, topo, device = run.cfg, ctx.topo, ctx.device
    t = cfg.train
    part = run.parts[topo.stage]
    groups = [dist.new_group(topo.stage_ranks(s)) for s in range(topo.stages)] if topo.replicas > 1 else None
    grad_hook = gradient_averager(groups[topo.stage], topo.replicas) if groups else None
    trainer = PartTrainer(part, run.part_lr(topo.stage), t, run.num_dims, run.n_bins, grad_hook=grad_hook,
                          name=f"part {topo.stage} (rank {topo.rank})")
    if topo.is_first:
        batches = run.train_batches()
        tests = run.test_batches() if topo.replica == 0 else None
        first = next(batches.epoch(0))
        messages = data_messages(
            t.by_parts_epochs,
            lambda e: (_rows(x, topo.replica, topo.replicas) for x in batches.epoch(e)),
            (lambda: tests.epoch(0)) if tests else None,
            first,  # every replica initialises its ActNorms from the whole first batch, as on one device
            device,
        )
    else:
        messages = inbox_messages(Inbox(topo.rank, topo.prev_rank, part.in_shape, device, cfg.distributed.timeout_s))
    outbox = None
    if not topo.is_last:
        outbox = Outbox(topo.rank, topo.next_rank, part.out_shape, device, cfg.distributed.in_flight,
                        ctx.bandwidth, counters, cfg.distributed.timeout_s)
    report = StageReport(topo.rank, topo.stage, topo.replica)
    run_stage(report, trainer, messages, outbox, t.log_every, on_eval)
    report.allreduce_bytes = grad_hook.bytes if grad_hook else 0
    return report, trainer


def gather_parts(run: Run, topo: Topology) -> int:
    """Broadcast each part from replica 0's owner of it: afterwards every rank holds the whole flow."""
    moved = 0
    for s, part in enumerate(run.parts):
        moved += broadcast_tensors(part.state_dict().values(), src=s)
    return moved


def train_multirank(cfg: Config, ctx: RankContext, out: str | Path, force: bool = False, on_eval=None) -> dict | None:
    """Run on this rank; returns the summary on rank 0 and None elsewhere."""
    topo, device = ctx.topo, ctx.device
    t = cfg.train
    wall_start = time.perf_counter()
    error = None
    try:
        check_run_dir(out, force=force)
        if t.batch_size % topo.world and cfg.distributed.finetune == "ddp" and (t.finetune_epochs or topo.stages == 1):
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.world} processes "
                            "for data-parallel fine-tuning")
        if t.batch_size % topo.replicas:
            raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of the {topo.replicas} replicas")
        shape = dataset_shape(cfg.data)
    except UserError as exc:
        error = exc
    _agreed(error, device, "checking the config")
    dist.barrier()  # every rank has checked the output directory before rank 0 writes into it

    model = build_model(cfg, shape).to(device)
    parts = build_parts(cfg, model, topo.stages) if topo.stages > 1 else [whole_model_part(model)]
    for part in parts:
        part.to(device)
    run = Run(cfg, None, model, parts, 0)
    if topo.is_first:
        try:
            run.data = load_dataset(cfg.data)
        except UserError as exc:
            error = exc
    _agreed(error, device, "loading the data")
    bins = torch.tensor([n_bins(run.data, cfg.data.n_bits) if run.data else 0], device=device)
    dist.all_reduce(bins, op=dist.ReduceOp.MAX)  # stage 0 knows the data's levels; tell the others
    run.n_bins = int(bins.item())

    log = None
    if topo.rank == 0:
        log = RunLog(prepare_run_dir(out, force=force), cfg)
    progress = Progress()
    counters = Counters()
    summary_phases: dict[str, dict] = {}
    reports = None
    gather_bytes = 0

    if topo.stages > 1 and t.by_parts_epochs:
        report, trainer = by_parts_phase(run, ctx, counters, on_eval)
        reports = gather_to_rank0({"report": asdict(report), "busy_fraction": report.busy_fraction,
                                   "allreduce_bytes": report.allreduce_bytes, "counters": asdict(counters),
                                   "skipped": trainer.skipped})
        gather_bytes = gather_parts(run, topo)
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

    # fine-tuning (or, with one stage, end-to-end data-parallel training from the start)
    ft_epochs = t.finetune_epochs if topo.stages > 1 else t.by_parts_epochs + t.finetune_epochs
    ft_name = "finetune" if topo.stages > 1 else "e2e"
    mode = cfg.distributed.finetune if topo.stages > 1 else "ddp"
    finetune_bytes = 0
    if ft_epochs and (mode == "ddp" or topo.rank == 0):
        if mode == "ddp":
            _load_data(run, device)
        if topo.stages == 1:  # e2e from scratch: every rank initialises from the same first batch
            model.initialize(next(run.train_batches().epoch(0)).to(device))
        lr = (t.finetune_lr or t.lr) if topo.stages > 1 else t.lr
        whole = whole_model_part(model)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

            wrap = (lambda m: DDP(m, device_ids=[device.index])) if device.type == "cuda" else DDP
            trainer = PartTrainer(whole, lr, t, run.num_dims, run.n_bins, wrap=wrap, name="whole model")

            def shard(x):
                return _rows(x, topo.rank, topo.world)

            def pooled_evaluate(trainers, tests, dev):
                totals, count = evaluation_sums(trainers, tests, dev, shard=lambda x: _rows_cover(x, topo))
                pooled = sum_across([*totals, float(count)], dev)
                return [v / max(pooled[-1], 1) for v in pooled[:-1]]

            phase = Phase(ft_name, ft_epochs, "e2e", [trainer])
            steps_before = progress.global_step
            run_phase(phase, run, device, log, progress, shard=shard, evaluate_fn=pooled_evaluate)
            # what DDP all-reduces: every gradient, every step (before the ring's 2(W-1)/W factor)
            finetune_bytes = 4 * sum(p.numel() for p in whole.parameters()) * (progress.global_step - steps_before)
        else:
            trainer = PartTrainer(whole, lr, t, run.num_dims, run.n_bins, name="whole model")
            phase = Phase(ft_name, ft_epochs, "e2e", [trainer])
            run_phase(phase, run, device, log, progress)
        summary_phases[ft_name] = {"epochs": ft_epochs, "seconds": phase.seconds,
                                   "schedule": "e2e" if mode == "rank0" else "ddp", "test_bpd": phase.test_bpd}

    if topo.rank != 0:
        return None
    if log is not None:
        log.close()
    save_model(Path(out) / "model.pt", model, cfg, run.n_bins)
    final_bpd = progress.history[-1]["test_bpd"] if progress.history else None
    if final_bpd is None:
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
        "skipped_steps": sum(r["skipped"] for r in reports) if reports else 0,
        "phases": summary_phases,
        "comm": {"forward_bytes": forward, "backward_bytes": backward,
                 "stage_allreduce_bytes": sum(r["allreduce_bytes"] for r in reports) if reports else 0,
                 "gather_bytes": gather_bytes, "finetune_allreduce_bytes": finetune_bytes},
        "ranks": [{"rank": r["report"]["rank"], "stage": r["report"]["stage"], "replica": r["report"]["replica"],
                   "steps": r["report"]["steps"], "images": r["report"]["images"], "seconds": r["report"]["seconds"],
                   "busy_fraction": r["busy_fraction"],
                   "images_per_s": r["report"]["images"] / max(r["report"]["seconds"], 1e-9)} for r in reports] if reports else [],
        "history": progress.history,
    }
    log.summary(summary)
    return summary


def _rows_cover(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """This rank's rows of a test batch; unlike training shards, the slices cover every row."""
    bounds = [len(x) * i // topo.world for i in range(topo.world + 1)]
    return x[bounds[topo.rank] : bounds[topo.rank + 1]]
