"""Fine-tuning without gathering: the glued flow trained end to end, each part staying on its rank.

``distributed.finetune = "pipeline"``. Part k's stage takes ``(h_{k-1}, carry)`` and returns
``(h_k, carry + log|det J_k| + log p(z factored by k))``; the last stage adds its top prior's
log-density and so returns log p(x) per sample (see :mod:`pipeflow.objective`). The loss is
the whole flow's negative log-likelihood in bits/dim, and its gradient flows back through
every stage (:mod:`pipeflow.distributed.pipelined`): the one fine-tuning phase where anything
travels backwards.

Each stage updates its own part with its own optimiser, which carries on the moments the part
built up by parts (``train.finetune_optimizer = "carry"``, no second warm-up) or starts afresh,
at ``train.finetune_lr`` (or ``train.lr``). Gradient clipping uses the norm of the *whole*
flow's gradient (the squared norms of the stages, summed across ranks), so a step is the step
one device takes on the same batch. Replicas of a stage average their gradients first.

The phase runs through the one training loop (:mod:`pipeflow.loop`); each rank checkpoints its
own part and optimiser, and a resumed run continues from the newest step every rank has saved.
At the end the parts are gathered on rank 0 (on the host) for ``model.pt``; that is the only gather.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from pipeflow.averaging import WeightAverage, weight_average
from pipeflow.data import load_dataset
from pipeflow.distributed.collectives import broadcast_object, gather_to_rank0, gradient_averager
from pipeflow.distributed.pipelined import PipelinedStage, forward_only, pipeline_groups
from pipeflow.distributed.transport import link_groups
from pipeflow.glow.model import is_initialized
from pipeflow.loop import Chain, DataStream, Hooks, PhaseName, run_loop
from pipeflow.objective import LN2, PartLikelihood, PartOutput, bits_per_dim
from pipeflow.state import RunState, checkpointing, evaluated, restore
from pipeflow.part_trainer import PartTrainer

if TYPE_CHECKING:
    from pipeflow.multirank import RankRun
    from pipeflow.train import Phase


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: a stage sends its input's gradient
    back, and the gradient a compiled graph returns may have other strides (gloo sends contiguous ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class StageLikelihood(nn.Module):
    """One part of the glued flow as a pipeline stage; the last one returns log p(x) per sample.

    Only the last stage's prior (the model's top prior) belongs to the glued flow: the others skip their
    boundary priors, which would cost a forward pass (the `flow` head's: two flow steps) whose result is
    never used.
    """

    def __init__(self, likelihood: PartLikelihood, first: bool, last: bool):
        super().__init__()
        self.likelihood, self.first, self.last = likelihood, first, last

    def forward(self, h: torch.Tensor, carry: torch.Tensor | None = None):
        if not self.first:
            h = _ContiguousGrad.apply(h)
        if self.last:
            h_out, own_terms, log_prior = self.likelihood(h)
        else:
            h_out, own_terms = self.likelihood.own_terms(h)
        carry = own_terms if carry is None else carry + own_terms
        # contiguous: what a stage sends must be (a compiled graph may return other strides)
        return carry + log_prior if self.last else (h_out.contiguous(), carry.contiguous())


def whole_flow_step(trainer: PartTrainer, loss: float | None, replicas: int,
                    device: torch.device) -> tuple[bool, float]:
    """Clip by the whole flow's gradient norm and count a non-finite step as every rank does.

    One all-reduce over every rank sums each stage's squared gradient norm (each replica's
    stage holds the same averaged gradient, so the sum counts each stage ``replicas`` times)
    and the last stages' losses. Returns (finite, the batch's mean loss).
    """
    sq = sum((p.grad.double().pow(2).sum() for p in trainer.params if p.grad is not None),
             torch.zeros((), dtype=torch.float64, device=device))
    both = torch.stack([sq, torch.tensor(loss or 0.0, dtype=torch.float64, device=device)])
    dist.all_reduce(both)
    total_sq, loss_sum = (both / replicas).tolist()
    norm = math.sqrt(total_sq) if math.isfinite(total_sq) else math.inf
    finite = math.isfinite(norm) and math.isfinite(loss_sum)
    clip = trainer.cfg.grad_clip
    if finite and clip > 0 and norm > 0:
        scale = min(1.0, clip / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_ does
        for p in trainer.params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return finite, loss_sum


def pipelined_step(trainer: PartTrainer, pipe: PipelinedStage, x: torch.Tensor | None, rows: int, average,
                   replicas: int, device: torch.device) -> float:
    """One fine-tuning step of this stage: forward and backward through the schedule, the replicas'
    average, the whole flow's clipping, the update. Returns the batch's mean loss (on every rank)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = pipe.step(x, rows)
    if average is not None:  # (a learned boundary prior gets no gradient end to end, on any replica)
        average([p.grad for p in trainer.params if p.grad is not None])
    finite, loss = whole_flow_step(trainer, loss, replicas, device)
    trainer.apply(finite)
    return loss


def stage_trainer(rr: "RankRun") -> PartTrainer:
    """This rank's part with a fine-tuning optimiser, carrying on its by-parts moments if asked."""
    t, topo = rr.cfg.train, rr.topo
    part = rr.run.parts[topo.stage]
    trainer = PartTrainer(part, t.finetune_lr or t.lr, t, rr.run.num_dims, rr.run.n_bins,
                          name=f"part {topo.stage} (rank {topo.rank})")
    if rr.carried:
        trainer.carry_on_from(rr.carried)
        rr.carried.clear()
    return trainer


def initialise_if_fresh(rr: "RankRun") -> None:
    """No by-parts epochs: every rank initialises the ActNorms of the whole flow (on the host) from the
    first batch, as one device does, then keeps its own part on its device."""
    from pipeflow.multirank import every_rank_agrees  # noqa: PLC0415 (multirank dispatches here)

    if is_initialized(rr.run.parts[rr.topo.stage]):  # (by parts, each rank initialised its own part)
        return
    rr.run.data = every_rank_agrees("loading the data", rr, rr.timeout,
                                    lambda: rr.run.data or load_dataset(rr.cfg.data))
    initialise_on_host(rr.run.model, rr.run.parts[rr.topo.stage], next(rr.run.train_batches().epoch(0)), rr.device)


def initialise_on_host(model: nn.Module, part: nn.Module, batch: torch.Tensor, device: torch.device) -> None:
    """The whole flow's ActNorms from ``batch`` on the host (every rank alike), then this rank's part on its device."""
    with torch.no_grad():
        model.to("cpu")
        model.initialize(batch)
    part.to(device)


def stage_module(trainer: PartTrainer, first: bool, last: bool, compile_: bool) -> StageLikelihood:
    """The stage a schedule drives; compiled after the ActNorms' data-dependent start, as PartTrainer compiles."""
    module = StageLikelihood(trainer.module, first, last)
    if compile_:  # what the stage runs (its own forward stays eager: it hands on contiguous tensors)
        (module.likelihood if last else module.likelihood.part).compile()
    return module


class PipelinedTrainer:
    """This stage as the training loop's one trainer: a step is the schedule's step, every stage at once.

    Stage 0 is handed the batch, the others only its size; every stage gets the whole flow's
    mean loss back (the last stage computes it), so the loop logs the same figures on any rank.
    """

    OWN = ("own_finetune_forward_bytes", "own_finetune_backward_bytes", "own_finetune_allreduce_bytes")

    def __init__(self, inner: PartTrainer, pipe: PipelinedStage, average, replicas: int, device: torch.device,
                 n_bins: int, state: RunState, ema: WeightAverage | None = None):
        self.inner, self.pipe, self.average, self.replicas, self.device = inner, pipe, average, replicas, device
        self.ema = ema  # train.eval_ema: this stage's averaged weights, updated after every step
        self.part = inner.part
        self.constant = math.log(n_bins) / LN2  # the dequantisation's, as in bits_per_dim
        self.before = [state.comm.get(k, 0) for k in self.OWN]  # what this rank sent before a resume

    def count_bytes(self, state: RunState) -> list[int]:
        """This rank's bytes of the phase so far, earlier attempts included, into its run state."""
        now = [*self.pipe.bytes_sent, self.average.bytes if self.average else 0]
        own = [a + b for a, b in zip(self.before, now)]
        state.comm.update(zip(self.OWN, own))
        return own

    @property
    def steps(self) -> int:
        return self.inner.steps

    @property
    def last_lr(self) -> float:
        return self.inner.last_lr

    @property
    def progress(self) -> float:
        return self.inner.progress

    @progress.setter
    def progress(self, value: float) -> None:  # train.lr_schedule: the inner trainer applies the rate
        self.inner.progress = value

    def train_step(self, h, carry) -> tuple[PartOutput, float, float]:
        x, rows = (h, len(h)) if isinstance(h, torch.Tensor) else (None, h)
        loss = pipelined_step(self.inner, self.pipe, x, rows, self.average, self.replicas, self.device)
        if self.ema is not None:
            self.ema.update()
        return PartOutput(None, None, None, None), loss, loss + self.constant


def pipelined_finetune(rr: "RankRun", phase: "Phase") -> None:
    """Fine-tune the glued flow through the pipelining schedule; rank 0 ends with the whole model."""
    from pipeflow.multirank import every_rank_agrees, start_replicas_equal  # noqa: PLC0415 (multirank dispatches here)

    topo, cfg = rr.topo, rr.cfg
    resumed = rr.blob is not None and rr.plan[0] == PhaseName.FINETUNE
    if not resumed:
        initialise_if_fresh(rr)
    rr.run.data = every_rank_agrees("loading the data", rr, rr.timeout, lambda: rr.run.data or (
        load_dataset(cfg.data) if topo.is_first else None))
    stage_group = link_groups(topo, rr.timeout).stage
    if stage_group is not None and not resumed:  # as the by-parts phase starts them
        start_replicas_equal(rr, stage_group)
    chain_group = pipeline_groups(topo.stages, topo.replicas, topo.rank, rr.timeout)
    trainer = stage_trainer(rr)
    ema = weight_average(trainer.part, cfg.train.eval_ema)  # each stage averages its own part
    if resumed:
        rr.state = every_rank_agrees("restoring the checkpoints", rr, rr.timeout,
                                     lambda: restore(rr.blob, [trainer.part], [trainer], rr.device, ema))
    module = stage_module(trainer, topo.is_first, topo.is_last, cfg.train.compile)
    d = rr.run.num_dims
    pipe = PipelinedStage(module, topo.stage, topo.stages, rr.device, cfg.distributed.microbatches,
                          cfg.distributed.pipeline_schedule, lambda logp, _: -logp.mean() / (d * LN2), chain_group)
    grads = gradient_averager(stage_group, topo.replicas) if stage_group is not None else None
    rr.state.phase = phase.name
    stepper = PipelinedTrainer(trainer, pipe, grads, topo.replicas, rr.device, rr.run.n_bins, rr.state, ema)
    _run(rr, phase, stepper, lambda msg, means: _evaluate(rr, phase, module, chain_group, msg.epoch, ema))
    rr.state.tally(phase.name).skipped = trainer.skipped
    sent = torch.tensor(stepper.count_bytes(rr.state), dtype=torch.float64, device=rr.device)  # NCCL: on the device
    dist.all_reduce(sent)  # every rank's, for the summary
    totals = (int(v) for v in sent.tolist())
    rr.state.comm["finetune_forward_bytes"], rr.state.comm["finetune_backward_bytes"], allreduce = totals
    # the gradients one replica's stages average with the other replicas', all stages together (as DDP's figure)
    rr.state.comm["finetune_allreduce_bytes"] = allreduce // topo.replicas
    for key in PipelinedTrainer.OWN:
        rr.state.comm.pop(key)
    rr.state.comm["gather_bytes"] = rr.state.comm.get("gather_bytes", 0) + gather_on_rank0(rr)


def _run(rr: "RankRun", phase: "Phase", stepper: PipelinedTrainer, evaluate) -> None:
    """The one training loop over this stage: stage 0 reads its replica's rows, the others count steps."""
    topo, cfg, state = rr.topo, rr.cfg, rr.state
    rows = cfg.train.batch_size // topo.replicas
    if topo.is_first:
        batches = rr.run.train_batches()
        def epoch(e, skip):
            return (x[topo.replica * rows:(topo.replica + 1) * rows] for x in batches.epoch(e, skip))
    else:
        def epoch(e, skip):
            return [rows] * (rr.steps_per_epoch - skip)
    data = DataStream(epoch, lambda: [], rr.device, rr.steps_per_epoch)  # (evaluation: a collective of its own)
    def owned():  # every rank its own part: nothing is gathered
        stepper.count_bytes(state)
        return [stepper.part], [stepper.inner], None

    stepped = checkpointing(state, rr.saver(), rr.steps_per_epoch, cfg.checkpoint.every_steps, owned, stepper.ema)

    first = cfg.train.by_parts_epochs
    hooks = Hooks(log=rr.log.log if rr.log else None, on_eval=evaluate, after_step=[stepped, *rr.ctx.hooks.after_step],
                  record_extra={"rank": topo.rank, "replica": topo.replica})
    chain = Chain([stepper], "e2e", phase.epochs, first, 0, first * rr.steps_per_epoch,
                  run_steps=rr.run_steps)
    run_loop(chain, data.phase(first, phase.epochs, state.step), state.tally(phase.name), hooks, phase.name,
             cfg.train.log_every, on_time=state.count_seconds)


def _evaluate(rr: "RankRun", phase: "Phase", module: nn.Module, group, epoch: int,
              average: WeightAverage | None) -> None:
    """The test bits/dim (and, with ``train.eval_ema``, the averaged weights') into rank 0's history."""
    bpd, rr.state.tally(phase.name).test_nonfinite = _test_bpd(rr, module, group)
    if average is not None:
        with average.applied():
            rr.state.tally(phase.name).test_bpd_ema = _test_bpd(rr, module, group)[0]
    # (no samples: no rank holds the whole flow)
    evaluated(rr.state, rr.log, phase.name, epoch, rr.state.step, [bpd], cfg=rr.cfg)


def _test_bpd(rr: "RankRun", module: nn.Module, group) -> tuple[float | None, int]:
    """Forward only through replica 0's stages; on every rank, the last one's mean bits/dim and how many
    test images gave no finite figure."""
    topo = rr.topo
    result = (None, 0)
    if topo.replica == 0:
        part = rr.run.parts[topo.stage]
        shapes = [] if topo.is_first else [part.in_shape, ()]
        tests = rr.run.test_batches().epoch(0) if topo.is_first else None
        total, count, bad = 0.0, 0, 0
        for logp in forward_only(module, topo.stage, topo.stages, tests, shapes, rr.device, group):
            bpd = bits_per_dim(logp, rr.run.num_dims, rr.run.n_bins).double()
            total, count, bad = total + float(bpd.sum()), count + len(logp), bad + int((~bpd.isfinite()).sum())
        result = (total / count if count else None, bad)
    return broadcast_object(result, src=topo.stages - 1)


def gather_on_rank0(rr: "RankRun") -> int:
    """Replica 0's parts, on the host, into rank 0's model (for ``model.pt``); returns the bytes gathered."""
    topo = rr.topo
    mine = None
    if topo.replica == 0 and topo.rank != 0:
        mine = {k: v.detach().cpu() for k, v in rr.run.parts[topo.stage].state_dict().items()}
    states = gather_to_rank0(mine)
    if topo.rank != 0:
        return 0
    moved = 0
    for s, state in enumerate(states[: topo.stages]):
        if state is not None:
            rr.run.parts[s].load_state_dict(state)
            moved += sum(v.numel() * v.element_size() for v in state.values())
    from pipeflow.multirank import place_whole_model  # noqa: PLC0415

    place_whole_model(rr.run.model, rr.run.parts, torch.device("cpu"))
    return moved
