"""One process of ``pipeflow bench``: times training steps of one configuration and reports.

    python -m torch.distributed.run --standalone --nproc_per_node=W -m pipeflow.tools.bench_worker SPEC.json

``pipeflow bench`` (:mod:`pipeflow.tools.bench`) starts W such processes through torch's launcher
(which tells each its RANK), with the spec it wrote, and reads back ``rank{RANK}.json`` from the
spec's ``out`` folder. Every mode drives the library's own training code; only the clock around it is new:

* ``single`` -- one process: the training loop (:mod:`pipeflow.loop`) over every part with a
  schedule (``e2e``, ``alternate`` or ``pipeline``), exactly as ``pipeflow train`` runs it.
* ``ddp``    -- P processes, end-to-end data-parallel: :class:`PartTrainer` of the whole
  model wrapped in DistributedDataParallel, each rank a 1/P shard of every batch (what
  ``pipeflow.launch`` does with ``train.schedule = "e2e"``). A communication hook counts
  the all-reduced bytes and, given a bandwidth, paces them (see ``collectives.CollectiveWatch``).
* ``stage``  -- P processes, the forward-only pipeline: rank r holds part r only and runs the
  same loop as a ``pipeflow.launch`` stage with the real Inbox/Outbox transport (the
  Outbox paces forward sends to the bandwidth).
* ``pipelined`` -- P processes, end-to-end pipeline parallelism (GPipe or 1F1B, ``schedule``):
  rank r holds part r only and takes the steps of ``distributed.finetune = "pipeline"``
  (:func:`pipeflow.pipelined_finetune.pipelined_step`), microbatches and gradients sent back.
* ``costs``  -- one process: :func:`pipeflow.tools.balance.measure_step_costs`.

With ``train.compile`` set in the spec's config, the same runs train compiled parts. After its
steps every training process measures the machine's own rate (:func:`conv_rate`), the measure
of its utilisation, and the least time its step's own convolutions take
(:func:`pipeflow.tools.conv_floor.convolution_floor`, on a forward pass of what it trains that
each mode hands back as ``probe``), the ceiling of that utilisation.

Memory (:class:`Memory`): the peak over the first two (warm-up) steps of CUDA allocated
memory, or of live anonymous memory on a CPU, above a baseline taken just before the
model is built (after imports, the process group and the batches). A pipeline rank frees
every layer but its own part before the window opens, so its figure is its part, its
optimiser state, its activations and its messages.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeflow.config import Config, from_dict
from pipeflow.data import Batches, ImageData, load_dataset
from pipeflow.distributed.process_group import RankEnv, choose_device, join, leave
from pipeflow.distributed.collectives import CollectiveWatch, watched_allreduce
from pipeflow.loop import Chain, DataStream, Hooks, Tally, inbox_stream, run_loop
from pipeflow.objective import hand_on, part_objective
from pipeflow.part_trainer import PartTrainer, make_optimizer
from pipeflow.build import build_model, build_parts, part_lr
from pipeflow.parts import Part
from pipeflow.tools.conv_floor import ConvCall, convolution_floor, synchronize, time_convolutions


# ---------------------------------------------------------------- memory

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_bytes() -> int | None:
    """Resident memory that is not file-backed (heap, tensors, thread stacks), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _load_lazy_modules(device: torch.device) -> None:
    """One tiny convolution and matrix-product update on ``device``: the first optimiser step
    imports much of torch lazily (some 80 MiB of Python modules), and on a GPU the first
    product allocates cuBLAS workspaces (for this thread and autograd's) from the caching
    allocator; neither is part of what training holds."""
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).to(device)
    weight = torch.nn.Parameter(torch.eye(2, device=device))
    for name in ("adam", "adamax"):
        opt = make_optimizer([*conv.parameters(), weight], name, 0.0)
        y = conv(torch.zeros(1, 2, 4, 4, device=device))
        (weight @ y[0].flatten(1)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(device)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(param: int, value: int) -> bool:
    try:
        import ctypes  # noqa: PLC0415

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def allocate_for_speed() -> None:
    """glibc's allocator as timed steps want it: large blocks from the heap, kept there between steps, so
    that no step pays for mapping and zeroing fresh pages (no-op where there is no glibc)."""
    _mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    _mallopt(M_TRIM_THRESHOLD, 64 * 2**20)


class Memory:
    """Peak memory of this process above a baseline, over the first ``WINDOW_STEPS`` steps.

    On CUDA: ``max_memory_allocated``. On a CPU there is no allocator counter, and the
    resident set is a poor one by default: glibc keeps freed blocks below its (growing)
    mmap threshold for reuse, so it measures the allocator's high-water mark, which depends on
    the order of allocations more than on what is live (the whole model's training step held
    805 MiB of resident memory where its tensors peak at about 540). So during the memory
    window glibc is told to give every block of 128 KiB or more its own mapping, returned at
    once when freed (``mallopt(M_MMAP_THRESHOLD)``), and the *anonymous* resident memory
    (resident minus file-backed pages: not the pages of torch's libraries that each kernel's
    first use maps in) is sampled every millisecond: it then follows the live tensors. That
    mode makes steps up to twice as slow, so the window is the first warm-up steps only
    (two, so that the optimiser's state is live), after which large blocks go back to the
    heap (a fixed 32 MiB threshold, as glibc's own adaptive one would settle) and the timed
    steps run at full speed. The kernel's high-water mark of the whole resident set over the
    window (VmHWM, reset at its start) is reported beside it.
    """

    WINDOW_STEPS = 2

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device, self.interval = device, interval
        self.can_reset = False
        self.exact_mmap = False
        self.baseline = self.baseline_rss = 0
        self.peak_anon = 0
        self.result: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        kb = _status_kb("VmRSS")
        return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def mark_baseline(self) -> None:
        """Just before the model is built (after a throw-away update has loaded what the first one loads)."""
        _load_lazy_modules(self.device)
        if self.device.type != "cuda" and os.environ.get("PIPEFLOW_BENCH_MALLOPT", "1") != "0":
            self.exact_mmap = _mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        gc.collect()
        if self.device.type == "cuda":
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = _anon_bytes() or 0
        self.baseline_rss = self._rss()

    def reset_peak(self) -> None:
        """Forget the peak so far (building the model, freeing what this rank does not hold); start watching."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:  # 5: reset the peak resident set size (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.can_reset = True
        except OSError:
            self.can_reset = False
        if self.device.type != "cuda" and _anon_bytes() is not None:
            self.peak_anon = _anon_bytes()
            self._thread = threading.Thread(target=self._watch, name="memory", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            now = _anon_bytes()
            if now is not None and now > self.peak_anon:
                self.peak_anon = now

    def step_done(self, steps: int) -> None:
        """Call after each training step with the number done: closes the window after WINDOW_STEPS."""
        if steps == self.WINDOW_STEPS and self.result is None:
            self.end_window()

    def end_window(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            now = _anon_bytes()
            if now is not None:
                self.peak_anon = max(self.peak_anon, now)
        hwm = _status_kb("VmHWM") if self.can_reset else None
        rss_peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type == "cuda":
            peak, source = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        elif self._thread is not None:
            peak = self.peak_anon
            source = "anonymous resident memory, sampled" + (", large blocks mmapped" if self.exact_mmap else "")
        else:
            peak, source = rss_peak, "VmHWM" if self.can_reset else "ru_maxrss"
            self.baseline = self.baseline_rss
        self.result = {"peak_bytes": max(peak - self.baseline, 0), "peak_abs_bytes": peak,
                       "baseline_bytes": self.baseline, "source": source,
                       "peak_rss_bytes": max(rss_peak - self.baseline_rss, 0), "peak_rss_abs_bytes": rss_peak,
                       "window_steps": self.WINDOW_STEPS}
        if self.exact_mmap:  # back to speed: large blocks from the heap again
            allocate_for_speed()

    def report(self) -> dict:
        if self.result is None:
            self.end_window()
        return self.result


# ---------------------------------------------------------------- set-up

def bench_batches(cfg: Config, batch: int, count: int, data: ImageData | None = None) -> list[torch.Tensor]:
    """The first ``count`` training batches of the config's data (epochs repeat if it has fewer)."""
    data = data or load_dataset(cfg.data)
    return Batches(data.x_train, data.levels, cfg.data.n_bits, batch, cfg.train.seed).first(count)


def _batches(spec: dict) -> list[torch.Tensor]:
    """The batches the parent wrote once for every run (so every run sees the same images)."""
    return list(torch.load(spec["batches"], weights_only=True))


def build_parts_from_cuts(cfg: Config, cuts: list[int]) -> tuple[torch.nn.Module, list[Part]]:
    """The model (seeded as every entry point seeds it) and its parts at explicit cut points."""
    from pipeflow.data import dataset_shape  # noqa: PLC0415

    model = build_model(cfg, dataset_shape(cfg.data))
    return model, build_parts(cfg, model, len(cuts) + 1, "cuts", cuts)


# ---------------------------------------------------------------- modes

class StepClock:
    """The bench's only addition to the training loop: a clock around each update (hooks).

    Times are ``perf_counter`` readings, one clock for every process of the machine, so the
    ranks' timelines line up; on a GPU each reading waits for the device first.
    """

    def __init__(self, device: torch.device, memory: Memory, chain: Chain):
        self.device, self.memory, self.chain = device, memory, chain
        self.intervals: list[tuple[float, float]] = []
        self.active: list[list[int]] = []
        self._start = 0.0

    def before(self, msg) -> None:
        self.active.append(self.chain.active(msg))
        synchronize(self.device)
        self._start = time.perf_counter()

    def trained(self, record: dict) -> None:
        if len(self.intervals) < len(self.active):  # the first trained part's record closes the step
            synchronize(self.device)
            self.intervals.append((self._start, time.perf_counter()))
            self.memory.step_done(len(self.intervals))

    def hooks(self, **more) -> Hooks:
        return Hooks(before_step=[self.before], on_step=self.trained, **more)

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in self.intervals]


def _stream(batches: list[torch.Tensor], device: torch.device, init: bool = True,
            rows=lambda x: x):
    """One epoch over the bench's batches (the first one initialises the ActNorms)."""
    timed = batches[1:]
    data = DataStream(lambda e, skip: (rows(x) for x in timed[skip:]), None, device, len(timed))
    return data.phase(0, 1, 0, batches[0] if init else None)


def run_single(spec: dict, rank: int, device: torch.device, memory: Memory) -> dict:
    cfg = from_dict(spec["config"])
    batches = _batches(spec)
    memory.mark_baseline()
    model, parts = build_parts_from_cuts(cfg, spec["cuts"])
    for part in parts:
        part.to(device)
    c, h, w = model.input_shape
    t = cfg.train
    trainers = [PartTrainer(p, part_lr(cfg, k, len(parts)), t, c * h * w, spec["n_bins"]) for k, p in enumerate(parts)]
    chain = Chain(trainers, spec["schedule"], epochs=1, alternate_every=1)  # alternate: turns of one step
    clock = StepClock(device, memory, chain)
    memory.reset_peak()
    run_loop(chain, _stream(batches, device), Tally(), clock.hooks(), "bench")
    probe = None if spec["schedule"] == "alternate" else trained_forward(trainers, spec["batch"], device)
    return {"step_seconds": clock.seconds, "active": clock.active, "rank": rank, "stage": 0,
            "memory": memory.report(), "skipped": sum(tr.skipped for tr in trainers), "probe": probe}


def run_ddp(spec: dict, rank: int, device: torch.device, memory: Memory) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    cfg = from_dict(spec["config"])
    world = spec["world"]
    batches = _batches(spec)
    memory.mark_baseline()
    model, (whole,) = build_parts_from_cuts(cfg, [])
    model.to(device)
    model.initialize(batches[0].to(device))  # every rank from the whole first batch, as pipeflow.launch does
    hook = CollectiveWatch(world, spec["bandwidth"])

    def wrap(module):
        ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(hook, watched_allreduce)
        return ddp

    c, h, w = model.input_shape
    trainer = PartTrainer(whole, cfg.train.lr, cfg.train, c * h * w, spec["n_bins"], wrap=wrap, name="whole model")
    chain = Chain([trainer], "e2e")
    clock = StepClock(device, memory, chain)
    rows = spec["batch"] // world

    def warmed_up(msg) -> None:
        if msg.step - 1 == spec["warmup"]:
            hook.reset()

    memory.reset_peak()
    hooks = clock.hooks()
    hooks.before_step.insert(0, warmed_up)
    run_loop(chain, _stream(batches, device, init=False, rows=lambda x: x[rank * rows : (rank + 1) * rows]), Tally(),
             hooks, "bench")
    timed = max(spec["steps"], 1)
    return {"step_seconds": clock.seconds, "rank": rank, "stage": 0, "memory": memory.report(),
            "skipped": trainer.skipped, "allreduce_bytes_per_step": hook.payload_bytes / timed,
            "wire_bytes_per_step": hook.wire_bytes / timed, "buckets_per_step": hook.buckets / timed,
            "paced_seconds": hook.paced_seconds, "params": sum(p.numel() for p in whole.parameters()),
            "probe": trained_forward([trainer], rows, device)}


def run_stage_mode(spec: dict, rank: int, device: torch.device, memory: Memory) -> dict:
    from pipeflow.distributed.topology import Topology  # noqa: PLC0415
    from pipeflow.distributed.transport import Counters, Inbox, Outbox, link_groups  # noqa: PLC0415

    cfg = from_dict(spec["config"])
    world = spec["world"]
    batches = _batches(spec) if rank == 0 else []
    memory.mark_baseline()
    model, parts = build_parts_from_cuts(cfg, spec["cuts"])
    c, h, w = model.input_shape
    part = parts[rank]
    params = sum(p.numel() for p in part.parameters())
    del model, parts  # this rank holds its part only
    part.to(device)
    t = cfg.train
    trainer = PartTrainer(part, part_lr(cfg, rank, world), t, c * h * w, spec["n_bins"], name=f"part {rank}")
    counters, timeout = Counters(), cfg.distributed.timeout_s
    # a group of its own for the bench's one mid-run wait: on the CPU, never on a link's communicator
    aligned = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    links = link_groups(Topology(rank, world, world), timeout)  # the same process groups as pipeflow.launch
    stream = _stream(batches, device) if rank == 0 else inbox_stream(Inbox(rank, rank - 1, part.in_shape, device,
                                                                           timeout, group=links.prev))
    outbox = None
    if rank < world - 1:
        outbox = Outbox(rank, rank + 1, part.out_shape, device, cfg.distributed.in_flight, spec["bandwidth"],
                        counters, timeout, group=links.next)
    chain = Chain([trainer], "pipeline")
    clock = StepClock(device, memory, chain)
    tally = Tally()
    send = (lambda msg, out: outbox.send(msg.kind, msg.epoch, msg.step, None if out is None else out.h,
                                         None if out is None else out.carry)) if outbox else None
    memory.reset_peak()
    dist.barrier()  # every rank ready: the clocks start together

    def compiled(msg) -> None:
        # a stage compiles in its first step (its ActNorms start eagerly on INIT); one still compiling would
        # hold the stage before it back, its queue full, into that one's timed steps. So every stage waits here
        # for all, and the rest of the warm-up fills the queues again before the clocks count.
        if msg.step == 1:
            dist.barrier(group=aligned)

    run_loop(chain, stream, tally, clock.hooks(send=send, after_step=[compiled]), "bench")
    if outbox is not None:
        outbox.close()
    return {"intervals": clock.intervals, "rank": rank, "stage": rank, "memory": memory.report(),
            "busy_seconds": tally.busy_seconds, "seconds": tally.seconds, "steps": tally.steps,
            "forward_bytes": counters.forward_bytes, "backward_bytes": counters.backward_bytes,
            "forward_messages": counters.forward_messages, "wire_seconds": counters.wire_seconds,
            "paced_seconds": counters.paced_seconds, "params": params, "skipped": trainer.skipped,
            "in_shape": list(part.in_shape), "out_shape": list(part.out_shape),
            "probe": trained_forward([trainer], spec["batch"], device)}


def run_pipelined_mode(spec: dict, rank: int, device: torch.device, memory: Memory) -> dict:
    from pipeflow.distributed.pipelined import PipelinedStage  # noqa: PLC0415
    from pipeflow.objective import LN2  # noqa: PLC0415
    from pipeflow.pipelined_finetune import initialise_on_host, pipelined_step, stage_module  # noqa: PLC0415

    cfg = from_dict(spec["config"])
    world = spec["world"]
    batches = _batches(spec)
    memory.mark_baseline()
    model, parts = build_parts_from_cuts(cfg, spec["cuts"])
    c, h, w = model.input_shape
    part = parts[rank]
    initialise_on_host(model, part, batches[0], device)  # as pipelined fine-tuning does with no by-parts epochs
    trained = [*part.layers.parameters(), *(part.prior.parameters() if rank == world - 1 else [])]
    params = sum(p.numel() for p in trained)  # the glued flow's: a boundary prior has no term in fine-tuning
    del model, parts  # this rank holds its part only
    t = cfg.train
    trainer = PartTrainer(part, t.lr, t, c * h * w, spec["n_bins"], name=f"part {rank}")
    d = c * h * w
    pipe = PipelinedStage(stage_module(trainer, rank == 0, rank == world - 1, t.compile), rank, world, device,
                          spec["microbatches"], spec["schedule"], lambda logp, _: -logp.mean() / (d * LN2), timed=True)
    intervals, compute, sent = [], [], []
    memory.reset_peak()
    dist.barrier()  # every rank ready: the clocks start together
    for x in batches[1:]:
        synchronize(device)
        start, busy0, bytes0 = time.perf_counter(), pipe.compute_seconds, pipe.bytes_sent
        pipelined_step(trainer, pipe, x.to(device) if rank == 0 else None, len(x), None, 1, device)
        synchronize(device)
        intervals.append((start, time.perf_counter()))
        compute.append(pipe.compute_seconds - busy0)
        sent.append([b - a for a, b in zip(bytes0, pipe.bytes_sent)])
        memory.step_done(len(intervals))
    return {"intervals": intervals, "compute_seconds": compute, "sent": sent, "rank": rank, "stage": rank,
            "memory": memory.report(), "params": params, "skipped": trainer.skipped,
            "in_shape": list(part.in_shape), "out_shape": list(part.out_shape),
            "probe": trained_forward([trainer], spec["batch"] // spec["microbatches"], device,
                                     times=spec["microbatches"], without_prior=rank < world - 1)}


def run_costs(spec: dict, rank: int, device: torch.device, memory: Memory) -> dict:
    from pipeflow.tools.balance import measure_step_costs  # noqa: PLC0415

    cfg = from_dict(spec["config"])
    x = _batches(spec)[0]
    model, _ = build_parts_from_cuts(cfg, [])
    model.to(device)
    x = x.to(device)
    model.initialize(x)
    train, forward = measure_step_costs(model, x, repeats=spec["repeats"], optimizer=cfg.train.optimizer)
    return {"train_seconds": train, "forward_seconds": forward, "rank": rank}


def conv_rate(spec: dict, device: torch.device, rows: int, repeats: int = 5) -> float:
    """FLOP/s of this process on a convolution of the model's shape: forward and backward.

    A 3x3 convolution from and to the coupling networks' hidden width, at the first level's
    resolution (the image once squeezed), on this rank's ``rows`` images: the bulk of what a
    Glow step computes, at the size it computes it. The fastest of ``repeats`` timed passes, in the
    run's memory layout (train.channels_last), so that a faster layout raises the rate it is held to.
    """
    hidden, h, w = spec["conv_shape"]
    layout = "nhwc" if spec["config"]["train"].get("channels_last") else "nchw"
    call = ConvCall((rows, hidden, h, w), (hidden, hidden, 3, 3), False, (1, 1), (1, 1), (1, 1), 1)
    seconds, _ = time_convolutions([call], device, (layout,), repeats)[call]
    return call.train_flops / seconds


def trained_forward(trainers: list[PartTrainer], rows: int, device: torch.device, times: int = 1,
                    without_prior: bool = False) -> Callable[[], None]:
    """A forward pass of what ``trainers`` train in one step, for :func:`convolution_floor` to record.

    Each part runs on a random latent of its input's shape: the convolutions' shapes do not depend on
    the values. ``times``: microbatches per step; ``without_prior``: a pipelined fine-tuning stage before
    the last, which trains its part without its boundary prior.
    """
    def forward() -> None:
        for _ in range(times):
            for tr in trainers:
                h = torch.randn(rows, *tr.part.in_shape, device=device)
                carry = torch.zeros(rows, device=device)
                if without_prior:
                    hand_on(tr.likelihood, h, carry)
                else:
                    part_objective(tr.likelihood, h, carry, tr.num_dims, tr.n_bins)
    return forward


MODES = {"single": run_single, "ddp": run_ddp, "stage": run_stage_mode, "pipelined": run_pipelined_mode,
         "costs": run_costs}


def main(argv: list[str] | None = None) -> int:
    """One rank: its number from torch's launcher, the process group as ``pipeflow.launch`` joins it."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    who = RankEnv.from_environ()
    rank = who.rank
    out = Path(spec["out"]) / f"rank{rank}.json"
    torch.set_num_threads(spec["threads"])
    backend = "nccl" if spec["device"] == "cuda" else "gloo"
    distributed = spec["world"] > 1
    try:
        if who.world != spec["world"]:
            raise RuntimeError(f"the spec asks for {spec['world']} ranks, the launcher started {who.world}")
        if distributed:
            device = join(backend, who, spec["timeout_s"]).device
        else:
            device = choose_device(backend, who.local_rank)[1]
        memory = Memory(device)
        result = MODES[spec["mode"]](spec, rank, device, memory)
        probe = result.pop("probe", None)  # what the process trains in a step, for the floor of its convolutions
        if spec["mode"] != "costs" and "conv_shape" in spec:
            rows = spec["batch"] // spec["world"] if spec["mode"] == "ddp" else spec["batch"]
            result["conv_flops_per_s"] = conv_rate(spec, device, rows)
            if probe is not None:
                result["conv_floor"] = convolution_floor(probe, device)
        result["threads"] = torch.get_num_threads()
        result["device"] = str(device)
        if distributed:
            dist.barrier()
        out.write_text(json.dumps(result))
        return 0
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which names the run)
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                                   "rank": rank}))
        return 1
    finally:
        leave()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
