"""``pipeflow bench``: throughput, memory and communication of every way to train one config.

On the same architecture, batch and data, and one process per rank (:mod:`pipeflow.tools.bench_worker`):

    e2e             end-to-end on one device (the baseline of every speed-up)
    e2e xN threads  end-to-end in one process given all the ranks' threads (the same cores)
    alternate       the paper's schedule on one device (one part trains per step)
    pipeline 1 dev  every part on every batch, on one device (what the P ranks compute)
    ddp             end-to-end data-parallel on P ranks (each a 1/P shard; all-reduces every gradient)
    pipeline <cut>  the forward-only pipeline on P ranks, one part each, per split scheme

A "device" on a CPU is ``--threads`` intra-op threads (default 1): P ranks get P x threads in
all, the e2e baseline gets threads, and the "e2e xN threads" row shows what the same P x threads
cores do for one end-to-end process. Images/s is the batch over the median step time after
warm-up (for the P-rank pipeline: over the largest of the ranks' median intervals between
updates: it goes as fast as its slowest stage); ``alternate`` takes the median step of each
part and averages them over the parts.

Next to each measurement stands its prediction: the FLOP model's (:mod:`pipeflow.tools.flops`) and,
with ``--measure-costs``, the model built from per-step costs measured on the device
(:func:`pipeflow.tools.balance.measure_step_costs`), which also gives the ``balanced-measured``
split. The paper's plan (E1 epochs by parts, E2 end to end) is predicted relative to E1 + E2
epochs end to end from both.

With ``--compile`` each of those runs is repeated with ``train.compile`` ("... compiled"), right
after its eager row. The compilation falls in the warm-up steps: what they took beyond as many
ordinary steps, less the same excess of the eager run, is the compilation time, reported apart
from the step time with the number of steps that pay it back. Every run reports its
*utilisation*: the FLOP model's FLOPs per second (a training step: 3x the forward pass) over the
rate each process measures on a 3x3 convolution of the model's shape
(:func:`pipeflow.tools.bench_worker.conv_rate`); for a P-rank pipeline, each stage's over its
busy time. Beside it stands its *ceiling*: the same FLOPs over the least time the step's own
convolutions take on the device, each timed alone in its faster memory layout
(:mod:`pipeflow.tools.conv_floor`). A step under its ceiling loses time outside its convolutions,
or runs them in a slower layout; a ceiling under a target says that, with these convolution
kernels, nothing done elsewhere in the step can meet it on this device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeflow.config import AUTOMATIC_SCHEMES, Config, with_overrides
from pipeflow.errors import UserError

ALL_MODES = ("e2e", "e2e-threads", "alternate", "pipeline-1dev", "ddp", "pipeline", "gpipe", "1f1b")
PIPELINED = ("gpipe", "1f1b")  # end-to-end pipeline parallelism (torch.distributed.pipelining), one part per rank
SCHEMES = (*AUTOMATIC_SCHEMES, "balanced-measured", "cuts")  # the bench adds the measured balance
SCHEME_ALIASES = {"measured": "balanced-measured"}
PAPER_PLAN = {2: 720 / 1026, 3: 647 / 1020}  # the paper's measured wall-time ratios (CIFAR-10 Glow, across)

Log = Callable[[str], None]


@dataclass
class BenchOptions:
    parts: int | None = None  # P (default: parts.count)
    steps: int = 20  # timed steps
    warmup: int = 3  # untimed steps first (at least 2: memory is measured over the first two)
    batch: int | None = None  # images per step (default: train.batch_size); DDP ranks get batch/P each
    threads: int = 1  # intra-op threads per device (process)
    bandwidths: list[float] = field(default_factory=lambda: [0.0])  # bytes/s per rank link; 0: unthrottled
    schemes: list[str] | None = None  # split schemes for the P-rank pipeline (default: configured + the others)
    measure_costs: bool = False  # measure per-step costs on the device (balanced-measured split, predictions)
    cost_repeats: int = 5
    modes: list[str] | None = None  # subset of ALL_MODES
    compile: bool = False  # also run each mode with train.compile, beside its eager row
    timeout_s: float = 1800.0  # per run
    keep: Path | None = None  # keep the workers' specs and results here


# ---------------------------------------------------------------- helpers

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _paper_config(cfg: Config, shape: tuple[int, int, int]) -> bool:
    m = cfg.model
    return (tuple(shape) == (3, 32, 32) and (m.levels, m.steps, m.hidden) == (3, 32, 512)
            and cfg.parts.count in PAPER_PLAN)


def parse_schemes(text: str | None) -> list[str] | None:
    if not text:
        return None
    out = []
    for s in (x.strip() for x in text.split(",")):
        s = SCHEME_ALIASES.get(s, s)
        if s not in SCHEMES:
            raise UserError(f"unknown --scheme {s!r}; choose from {', '.join(SCHEMES)} (comma-separated)")
        if s not in out:
            out.append(s)
    return out


def parse_modes(text: str | None) -> list[str] | None:
    if not text:
        return None
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        raise UserError(f"unknown --only {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
    return modes


def _launch(spec: dict, world: int, work: Path, name: str, timeout_s: float) -> list[dict]:
    """Run ``world`` worker processes on ``spec`` under torch's own launcher; return each rank's result.

    ``torch.distributed.run --standalone`` gives the workers their ranks and a rendezvous of
    their own (no port to pick), as ``torchrun`` does for ``pipeflow.launch``; each worker's
    output goes to ``logs/<run>/attempt_0/<rank>/``. Raises, naming the run and the rank, on failure.
    """
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(run_dir), "world": world}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "--redirects", "3", "--log-dir", str(run_dir / "logs"),
               "-m", "pipeflow.tools.bench_worker", str(spec_path)]
    failed = "interrupted"
    with open(run_dir / "launcher.log", "w") as log:
        # a session of its own: on a timeout the launcher and every worker it started are ended together
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            failed = None if proc.returncode == 0 else f"a rank failed (the launcher exited with {proc.returncode})"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout_s:.0f} s"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = [json.loads(p.read_text()) if (p := run_dir / f"rank{rank}.json").is_file() else None
               for rank in range(world)]
    # the rank that failed first, then any rank left without a result (stopped because another failed)
    for rank in sorted(range(world), key=lambda r: results[r] is None):
        result = results[rank]
        if result is None or "error" in result:
            detail = result["error"] if result else _worker_output(run_dir, rank)
            raise RuntimeError(f"{name}, rank {rank}: {detail or failed or 'no result'}")
    if failed:
        raise RuntimeError(f"{name}: {failed}")
    return results


def _worker_output(run_dir: Path, rank: int) -> str:
    """The end of what worker ``rank`` printed (or, if it never started, of what the launcher printed)."""
    logs = sorted((run_dir / "logs").glob(f"*/attempt_0/{rank}/std*.log"))
    text = "".join(p.read_text() for p in logs if p.is_file()).strip()
    if not text and (run_dir / "launcher.log").is_file():
        text = (run_dir / "launcher.log").read_text().strip()
    return text[-800:]


# ---------------------------------------------------------------- what each run measured

def _single_metrics(result: dict, warmup: int, parts: int, schedule: str) -> dict:
    times, active = result["step_seconds"][warmup:], result["active"][warmup:]
    if schedule == "alternate":
        by_part = [[t for t, a in zip(times, active) if a == [k]] for k in range(parts)]
        per_part = [_median(ts) for ts in by_part if ts]
        step = sum(per_part) / len(per_part)
        extra = {"step_seconds_by_part": per_part}
    else:
        step = _median(times)
        extra = {}
    return {"step_seconds": step, "step_seconds_mean": statistics.fmean(times), "step_times": times, **extra,
            "warmup_seconds": sum(result["step_seconds"][:warmup]),
            "ranks": [{"rank": 0, "stage": None, "busy_fraction": 1.0, "busy_seconds_per_step": step,
                       "idle_seconds_per_step": 0.0, **_conv_figures(result),
                       **_memory(result)}],
            "forward_bytes_per_step": 0, "backward_bytes_per_step": 0, "forward_bytes_per_rank_per_step": 0,
            "backward_bytes_per_rank_per_step": 0, "skipped_steps": result["skipped"]}


def _conv_figures(result: dict) -> dict:
    """A process's convolution rate (the reference of utilisation) and the floor of its step's convolutions."""
    floor = result.get("conv_floor") or {}
    return {"conv_flops_per_s": result.get("conv_flops_per_s"), "conv_floor_seconds": floor.get("seconds"),
            "convolutions": floor.get("convolutions")}


def _memory(result: dict) -> dict:
    m = result["memory"]
    return {"peak_memory_bytes": m["peak_bytes"], "peak_memory_abs_bytes": m["peak_abs_bytes"],
            "memory_source": m["source"]}


def _ddp_metrics(results: list[dict], warmup: int) -> dict:
    # the ranks wait for each other in every all-reduce: a step is as long as the slowest rank's
    per_step = [max(ts) for ts in zip(*(r["step_seconds"][warmup:] for r in results))]
    step = _median(per_step)
    r0 = results[0]
    warm = [max(ts) for ts in zip(*(r["step_seconds"][:warmup] for r in results))]
    return {"step_seconds": step, "step_seconds_mean": statistics.fmean(per_step), "step_times": per_step,
            "warmup_seconds": sum(warm),
            "ranks": [{"rank": r["rank"], "stage": None, "busy_fraction": None, "busy_seconds_per_step": None,
                       "idle_seconds_per_step": None, "sent_bytes_per_step": r["wire_bytes_per_step"],
                       **_conv_figures(r),
                       "paced_seconds": r.get("paced_seconds", 0.0), **_memory(r)}
                      for r in results],
            "forward_bytes_per_step": 0,
            # what DDP moves: every gradient, every step; a ring all-reduce makes each rank send 2(P-1)/P of it
            "allreduce_bytes_per_step": r0["allreduce_bytes_per_step"],
            "backward_bytes_per_rank_per_step": r0["wire_bytes_per_step"],
            "backward_bytes_per_step": sum(r["wire_bytes_per_step"] for r in results),
            "forward_bytes_per_rank_per_step": 0,
            "skipped_steps": r0["skipped"], "params": r0["params"]}


def _stage_metrics(results: list[dict], warmup: int, steps: int) -> dict:
    """A pipeline goes as fast as its slowest stage. Each rank's step time is the median interval
    between the ends of its consecutive timed updates; the pipeline's is the largest of them (the last
    stage alone can look faster than the pipeline while it drains messages queued ahead of it)."""
    t0 = min(r["intervals"][0][0] for r in results)
    ranks, medians = [], []
    for r in results:
        iv = r["intervals"]
        ends = [e for _, e in iv]
        gaps = [b - a for a, b in zip(ends[warmup - 1 : warmup + steps - 1], ends[warmup : warmup + steps])]
        medians.append(_median(gaps))
        window = iv[warmup + steps - 1][1] - iv[warmup - 1][1]
        busy = sum(e - s for s, e in iv[warmup : warmup + steps])
        messages = r["forward_messages"]
        fwd = (r["forward_bytes"] - 32) / (messages - 1) if messages > 1 else 0  # less the STOP header; INIT counts
        ranks.append({"rank": r["rank"], "stage": r["stage"], "busy_fraction": busy / window if window > 0 else None,
                      "busy_seconds_per_step": busy / steps, "idle_seconds_per_step": (window - busy) / steps,
                      "step_seconds": medians[-1], "step_times": gaps,
                      "forward_bytes_per_step": fwd, "sent_bytes_per_step": fwd, "wire_seconds": r["wire_seconds"],
                      "paced_seconds": r.get("paced_seconds", 0.0), **_conv_figures(r),
                      "params": r["params"], "in_shape": r.get("in_shape"), "out_shape": r.get("out_shape"),
                      # every update of the rank, warm-up included: (start, end) in seconds from the first update
                      "updates": [(round(a - t0, 6), round(b - t0, 6)) for a, b in iv],
                      **_memory(r)})
    slowest = max(range(len(ranks)), key=lambda k: medians[k])
    gaps = ranks[slowest]["step_times"]
    return {"step_seconds": medians[slowest], "step_seconds_mean": statistics.fmean(gaps), "step_times": gaps,
            "warmup_seconds": max(r["intervals"][warmup - 1][1] for r in results) - t0,
            "slowest_rank": slowest, "ranks": ranks,
            "forward_bytes_per_step": sum(x["forward_bytes_per_step"] for x in ranks),  # over every link
            "forward_bytes_per_rank_per_step": max(x["forward_bytes_per_step"] for x in ranks),
            "backward_bytes_per_step": sum(r["backward_bytes"] for r in results) / max(steps, 1),
            "backward_bytes_per_rank_per_step": max(r["backward_bytes"] for r in results) / max(steps, 1),
            "skipped_steps": sum(r["skipped"] for r in results)}


def _pipelined_metrics(results: list[dict], warmup: int, steps: int) -> dict:
    """GPipe or 1F1B: every rank takes part in every step, so a step is as long as its slowest rank's;
    a rank is busy inside its microbatches' forward and backward passes, idle (the bubble) otherwise."""
    per_step = [max(b - a for a, b in ivs) for ivs in zip(*(r["intervals"][warmup : warmup + steps] for r in results))]
    t0 = min(r["intervals"][0][0] for r in results)
    ranks = []
    for r in results:
        window = sum(b - a for a, b in r["intervals"][warmup : warmup + steps])
        busy = sum(r["compute_seconds"][warmup : warmup + steps])
        fwd, bwd = (statistics.fmean(x[k] for x in r["sent"][warmup : warmup + steps]) for k in (0, 1))
        ranks.append({"rank": r["rank"], "stage": r["stage"], "busy_fraction": busy / window if window > 0 else None,
                      "busy_seconds_per_step": busy / steps, "idle_seconds_per_step": (window - busy) / steps,
                      "forward_bytes_per_step": fwd, "backward_bytes_per_step": bwd, "sent_bytes_per_step": fwd + bwd,
                      **_conv_figures(r), "params": r["params"],
                      "in_shape": r["in_shape"], "out_shape": r["out_shape"], **_memory(r)})
    return {"step_seconds": _median(per_step), "step_seconds_mean": statistics.fmean(per_step), "step_times": per_step,
            "warmup_seconds": max(r["intervals"][warmup - 1][1] for r in results) - t0,
            "ranks": ranks, "forward_bytes_per_step": sum(x["forward_bytes_per_step"] for x in ranks),
            "forward_bytes_per_rank_per_step": max(x["forward_bytes_per_step"] for x in ranks),
            "backward_bytes_per_step": sum(x["backward_bytes_per_step"] for x in ranks),
            "backward_bytes_per_rank_per_step": max(x["backward_bytes_per_step"] for x in ranks),
            "skipped_steps": max(r["skipped"] for r in results)}


# ---------------------------------------------------------------- the bench

def bench(cfg: Config, opts: BenchOptions, log: Log | None = None, command: str | None = None) -> dict:
    """Run every measurement ``opts`` asks for; return the report (every figure)."""
    import torch  # noqa: PLC0415

    from pipeflow.build import build_model, resolve_device  # noqa: PLC0415
    from pipeflow.data import dataset_shape  # noqa: PLC0415
    from pipeflow.tools.flops import step_flops  # noqa: PLC0415

    log = log or (lambda message: None)
    started = time.time()
    P, B, modes = _checked_sizes(cfg, opts)
    cfg = with_overrides(cfg, [f"parts.count={P}", f"train.batch_size={B}"])
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and ("ddp" in modes or "pipeline" in modes) and torch.cuda.device_count() < P:
        raise UserError(f"{P} ranks need {P} GPUs, {torch.cuda.device_count()} visible; "
                        "use --parts or --set train.device=cpu")
    shape = dataset_shape(cfg.data)
    batches, bins = _bench_batches(cfg, B, opts)
    model = build_model(cfg, shape)
    flops = step_flops(model)
    schemes = _schemes(cfg, opts)
    base_spec = {"config": cfg.to_dict(), "batch": B, "warmup": opts.warmup, "steps": opts.steps,
                 "threads": opts.threads, "bandwidth": 0.0, "n_bins": bins, "device": device.type,
                 "timeout_s": cfg.distributed.timeout_s, "cuts": [],
                 "conv_shape": [cfg.model.hidden, shape[1] // 2, shape[2] // 2]}  # see bench_worker.conv_rate
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="pipeflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base_spec["batches"] = str(work / "batches.pt")
    torch.save(torch.stack(batches), base_spec["batches"])
    del batches
    report = _new_report(command, cfg, opts, device, P, B, schemes, modes, shape, bins, flops)
    session = _Session(opts, P, B, base_spec, work, report, log)
    try:
        measured = _measure_costs(session, len(flops)) if "balanced-measured" in schemes else None
        if measured is None:
            schemes = [s for s in schemes if s != "balanced-measured"]
        report["splits"] = splits = _splits(cfg, model, schemes, P, measured, report["notes"])
        _run_on_one_device(session, modes, splits)
        for bw in opts.bandwidths:
            _run_on_ranks(session, modes, splits, bw)
        _run_pipelined(session, modes, splits, cfg.distributed.microbatches)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_after"] = _load()
    report["seconds"] = time.time() - started
    _derive(report, cfg, shape, P)
    return report


def _checked_sizes(cfg: Config, opts: BenchOptions) -> tuple[int, int, list[str]]:
    """The number of ranks P, the batch and the modes, once the options are known to make sense."""
    P = opts.parts or cfg.parts.count
    B = opts.batch or cfg.train.batch_size
    if P < 2:
        raise UserError("bench compares P ranks with one device: give --parts 2 or more")
    if opts.steps < 1 or opts.warmup < 2:
        raise UserError("bench needs --steps >= 1 and --warmup >= 2 (memory is measured over the first two steps)")
    if opts.threads < 1:
        raise UserError("--threads must be at least 1")
    if any(bw < 0 for bw in opts.bandwidths):
        raise UserError("--bandwidth must be 0 (unthrottled) or a positive number of bytes/s")
    modes = list(opts.modes or ALL_MODES)
    if "ddp" in modes and B % P:
        raise UserError(f"--batch {B} must be a multiple of --parts {P}: DDP gives each rank batch/P images")
    m = cfg.distributed.microbatches
    if any(x in modes for x in PIPELINED) and B % m:
        raise UserError(f"--batch {B} must be a multiple of distributed.microbatches = {m} for gpipe and 1f1b")
    return P, B, modes


def _bench_batches(cfg: Config, B: int, opts: BenchOptions) -> tuple[list, int]:
    """The batches every run trains on (the same images for all) and the data's number of bins."""
    from pipeflow.data import load_dataset, n_bins  # noqa: PLC0415
    from pipeflow.tools.bench_worker import bench_batches  # noqa: PLC0415

    data = load_dataset(cfg.data)
    if len(data.x_train) < B:
        raise UserError(f"--batch {B} is larger than the {len(data.x_train)} training images")
    return bench_batches(cfg, B, 1 + opts.warmup + opts.steps, data), n_bins(data, cfg.data.n_bits)


def _schemes(cfg: Config, opts: BenchOptions) -> list[str]:
    """The split schemes to run: those asked for, else the configured one first and then the others."""
    others = [s for s in AUTOMATIC_SCHEMES if s != cfg.parts.scheme]
    schemes = list(opts.schemes or [cfg.parts.scheme, *others])
    if opts.measure_costs and "balanced-measured" not in schemes:
        schemes.append("balanced-measured")
    return schemes


def _new_report(command: str | None, cfg: Config, opts: BenchOptions, device, P: int, B: int, schemes: list[str],
                modes: list[str], shape, bins: int, flops: list[float]) -> dict:
    """The report before any run: the command, the machine and the settings."""
    import torch  # noqa: PLC0415

    return {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device.type,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "load_before": _load()},
        "settings": {"parts": P, "batch": B, "steps": opts.steps, "warmup": opts.warmup,
                     "microbatches": cfg.distributed.microbatches,
                     "threads_per_rank": opts.threads, "bandwidths": opts.bandwidths, "schemes": schemes,
                     "modes": modes, "image_shape": list(shape), "n_bins": bins,
                     "model": cfg.model.__dict__, "epochs": {"by_parts": cfg.train.by_parts_epochs,
                                                             "finetune": cfg.train.finetune_epochs}},
        "config": cfg.to_dict(), "step_costs": {"flops": flops}, "splits": {}, "runs": [], "notes": [],
    }


@dataclass
class _Session:
    """One bench invocation: what every run's workers share, where they write, and the report they fill."""

    opts: BenchOptions
    parts: int
    batch: int
    base_spec: dict
    work: Path
    report: dict
    log: Log

    def variants(self) -> list[tuple[str, dict]]:
        """(name suffix, spec changes) of each variant of a run: eager, then compiled if asked for."""
        if not self.opts.compile:
            return [("", {})]
        config = {**self.base_spec["config"], "train": {**self.base_spec["config"]["train"], "compile": True}}
        return [("", {}), (" compiled", {"config": config})]

    def launch(self, changes: dict, world: int, name: str) -> list[dict]:
        """Run ``world`` workers on the shared spec with ``changes``; each rank's result."""
        return _launch({**self.base_spec, **changes}, world, self.work, name, self.opts.timeout_s)

    def record(self, name: str, kind: str, metrics: dict, **extra) -> None:
        entry = {"name": name, "kind": kind, **extra, **metrics, "load_after": _load()}
        entry["images_per_s"] = self.batch / entry["step_seconds"] if entry["step_seconds"] > 0 else None
        self.report["runs"].append(entry)
        self.log(f"  {name}: {entry['images_per_s']:.1f} images/s, step {1000 * entry['step_seconds']:.1f} ms")

    def attempt(self, name: str, run: Callable[[], None]) -> None:
        """Run one measurement; a failed one is recorded as such and the bench goes on."""
        self.log(f"run {name} ...")
        try:
            run()
        except RuntimeError as exc:
            self.report["runs"].append({"name": name, "error": str(exc)})
            self.log(f"  {name} failed: {exc}")


def _measure_costs(session: _Session, steps: int) -> tuple[list[float], list[float]] | None:
    """Each flow step's measured (train, forward) seconds on the device; None, with a note, if that failed."""
    session.log(f"measuring the cost of each of the {steps} flow steps on {session.base_spec['device']} ...")
    try:
        (res,) = session.launch({"mode": "costs", "repeats": session.opts.cost_repeats}, 1, "costs")
    except RuntimeError as exc:
        session.report["notes"].append(f"measuring step costs failed: {exc}")
        return None
    session.report["step_costs"].update(measured_train_seconds=res["train_seconds"],
                                        measured_forward_seconds=res["forward_seconds"])
    return res["train_seconds"], res["forward_seconds"]


def _splits(cfg: Config, model, schemes: list[str], P: int, measured: tuple[list[float], list[float]] | None,
            notes: list[str]) -> dict[str, dict]:
    """Each scheme's split: its cuts, and the FLOP share and measured share of each part."""
    from pipeflow.build import build_parts  # noqa: PLC0415
    from pipeflow.tools.balance import balanced_cuts  # noqa: PLC0415
    from pipeflow.tools.plan import scheme_parts  # noqa: PLC0415

    splits: dict[str, dict] = {}
    for scheme in schemes:
        try:
            if scheme == "balanced-measured":
                parts = build_parts(cfg, model, P, "cuts", balanced_cuts(measured[0], P))
            else:
                parts = scheme_parts(cfg, model, scheme, P)
        except UserError as exc:
            notes.append(f"scheme {scheme}: {exc}")
            continue
        split = _describe_split(model, parts, measured)
        split["same_as"] = next((s for s, v in splits.items() if v["cuts"] == split["cuts"]), None)
        splits[scheme] = split
    if "balanced-measured" in splits:
        cuts = splits["balanced-measured"]["cuts"]
        notes.append(f"to train on the measured balanced split: --set parts.scheme=cuts --set 'parts.cuts={cuts}'")
    if not splits:
        raise UserError("none of the split schemes fits this model: " + "; ".join(notes))
    return splits


def _describe_split(model, parts: list, measured: tuple[list[float], list[float]] | None) -> dict:
    """One split's cuts, parts, and the step ratios the FLOP model (and the measured costs) predict for it."""
    from pipeflow.tools.balance import part_costs  # noqa: PLC0415
    from pipeflow.tools.flops import alternate_cost_ratio, part_flops, stage_cost_ratio  # noqa: PLC0415
    from pipeflow.tools.plan import cuts_of, describe_parts, measured_alternate_ratio  # noqa: PLC0415

    train, forward = measured or (None, None)
    cuts = cuts_of(parts)
    pf = part_flops(model, parts)
    glued = part_flops(model, parts, with_priors=False)  # what fine-tuning the glued flow runs
    split = {
        "cuts": cuts, "same_as": None,
        "parts": [{"steps": list(r.steps), "params": r.params, "flops": r.flops, "flops_glued": g,
                   "flop_share": r.share, "measured_share": r.measured_share, "in_shape": list(r.in_shape),
                   "out_shape": list(r.out_shape)} for r, g in zip(describe_parts(model, parts, train), glued)],
        "flop_model": {"alternate_step": alternate_cost_ratio(pf, glued), "pipeline_step": stage_cost_ratio(pf)},
    }
    if train:
        split["measured_model"] = {"alternate_step": measured_alternate_ratio(train, forward, cuts),
                                   "pipeline_step": stage_cost_ratio(part_costs(train, cuts))}
    return split


def _run_on_one_device(session: _Session, modes: list[str], splits: dict[str, dict]) -> None:
    """The one-process runs: e2e, e2e on every rank's threads, alternate and the pipeline on one device."""
    threads, P = session.opts.threads, session.parts
    primary = next(iter(splits))
    cuts = splits[primary]["cuts"]
    if "e2e" in modes:
        _run_single(session, "e2e", "e2e", [], threads)
    if "e2e-threads" in modes:
        _run_single(session, f"e2e x{P * threads} threads", "e2e", [], P * threads)
    if "alternate" in modes:
        _run_single(session, f"alternate {primary}", "alternate", cuts, threads, primary)
    if "pipeline-1dev" in modes:
        _run_single(session, f"pipeline {primary} 1 dev", "pipeline", cuts, threads, primary)


def _run_single(session: _Session, name: str, schedule: str, cuts: list[int], threads: int,
                scheme: str | None = None) -> None:
    for suffix, changes in session.variants():
        def run(suffix=suffix, changes=changes) -> None:
            (res,) = session.launch({"mode": "single", "schedule": schedule, "cuts": cuts, "threads": threads,
                                     **changes}, 1, name + suffix)
            session.record(name + suffix, "single", _single_metrics(res, session.opts.warmup, len(cuts) + 1, schedule),
                           schedule=schedule, scheme=scheme, cuts=cuts, ranks_count=1, threads_per_rank=threads,
                           bandwidth=None, compiled=bool(suffix))
        session.attempt(name + suffix, run)


def _run_on_ranks(session: _Session, modes: list[str], splits: dict[str, dict], bw: float) -> None:
    """The P-rank runs over links of ``bw`` bytes/s: DDP, then the pipeline of every distinct split."""
    P, opts = session.parts, session.opts
    link = f" @{_fmt_bw(bw)}" if bw else ""
    for suffix, changes in session.variants() if "ddp" in modes else []:
        def run_ddp(suffix=suffix, changes=changes) -> None:
            res = session.launch({"mode": "ddp", "bandwidth": bw, **changes}, P, f"ddp{_slug(bw)}{suffix}")
            session.record(f"ddp x{P}{link}{suffix}", "ddp", _ddp_metrics(res, opts.warmup), schedule="e2e",
                           scheme=None, cuts=[], ranks_count=P, threads_per_rank=opts.threads, bandwidth=bw,
                           compiled=bool(suffix))
        session.attempt(f"ddp x{P}{link}{suffix}", run_ddp)
    if "pipeline" not in modes:
        return
    for scheme, split in splits.items():
        name = f"pipeline {scheme} x{P}{link}"
        if split["same_as"]:
            session.report["notes"].append(f"{name}: the same cuts as {split['same_as']}, not run again")
            continue

        for suffix, changes in session.variants():
            def run_pipeline(scheme=scheme, cuts=split["cuts"], name=name + suffix, changes=changes) -> None:
                res = session.launch({"mode": "stage", "bandwidth": bw, "cuts": cuts, **changes}, P,
                                     f"pipeline-{scheme}{_slug(bw)}{suffix.replace(' ', '-')}")
                session.record(name, "pipeline", _stage_metrics(res, opts.warmup, opts.steps), schedule="pipeline",
                               scheme=scheme, cuts=cuts, ranks_count=P, threads_per_rank=opts.threads, bandwidth=bw,
                               compiled=bool(changes))
            session.attempt(name + suffix, run_pipeline)


def _run_pipelined(session: _Session, modes: list[str], splits: dict[str, dict], microbatches: int) -> None:
    """GPipe and 1F1B end to end on P ranks, at the cuts of the first split the pipeline ran (unthrottled links)."""
    P, opts = session.parts, session.opts
    scheme, split = next(((k, v) for k, v in splits.items() if not v["same_as"]), (None, {"cuts": []}))
    for schedule, (suffix, changes) in ((m, v) for m in PIPELINED if m in modes for v in session.variants()):
        name = f"{schedule} x{P}{suffix}"

        def run(schedule=schedule, name=name, changes=changes) -> None:
            res = session.launch({"mode": "pipelined", "schedule": schedule, "microbatches": microbatches,
                                  "cuts": split["cuts"], **changes}, P, schedule + suffix.replace(" ", "-"))
            session.record(name, "pipelined", _pipelined_metrics(res, opts.warmup, opts.steps), schedule=schedule,
                           scheme=scheme, cuts=split["cuts"], ranks_count=P, threads_per_rank=opts.threads,
                           bandwidth=0.0, microbatches=microbatches, compiled=bool(changes))
        session.attempt(name, run)


def _fmt_bw(bw: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bw >= scale:
            return f"{bw / scale:g} {unit}"
    return f"{bw:g} B/s"


def _slug(bw: float) -> str:
    return f"-bw{int(bw)}" if bw else ""


def _derive(report: dict, cfg: Config, shape, P: int) -> None:
    """Speed-ups, ratios to end-to-end, predictions of the paper's plan, and the targets."""
    runs = [r for r in report["runs"] if "error" not in r]
    e2e = next((r for r in runs if r["name"] == "e2e"), None)
    for r in runs:
        _add_ratios(r, e2e, report["splits"], P, report["settings"]["threads_per_rank"])
        _add_utilisation(r, report)
        r["warmup_extra_seconds"] = r["warmup_seconds"] - report["settings"]["warmup"] * r["step_seconds"]
    for r in runs:
        if r.get("compiled"):
            _add_compile_figures(r, next((e for e in runs if e["name"] == r["name"].removesuffix(" compiled")), None))
    eager = [r for r in runs if not r.get("compiled")]  # the targets before compilation keep their meaning
    report["predictions"] = _predictions(eager, cfg, shape, P)
    report["targets"] = (_targets(report, eager, e2e, P) + _pipelined_targets(eager)
                         + _compile_targets(runs, e2e))


def _rate(ranks: list[dict]) -> float | None:
    rates = [x.get("conv_flops_per_s") for x in ranks]
    return sum(rates) if rates and None not in rates else None


def _add_utilisation(r: dict, report: dict) -> None:
    """The model's FLOPs per second in a run, over the convolution rate of its processes, and its ceiling.

    A training step costs 3x the forward FLOPs (:mod:`pipeflow.tools.flops`) of what it trains:
    the whole model (``alternate``: the FLOP model's share of it). A pipeline stage's figure is its
    own part's over its busy time, on its own rank's rate (GPipe's and 1F1B's too, over their microbatches).
    The ceiling is the same FLOPs over the measured floor of the step's convolutions on the device
    (:mod:`pipeflow.tools.conv_floor`; the slowest rank's, for DDP; a pipeline's, per stage): what a step
    whose convolutions all ran at their best, and whose other work were free, would reach.
    """
    from pipeflow.tools.flops import BACKWARD_FACTOR  # noqa: PLC0415

    train = (1 + BACKWARD_FACTOR) * report["settings"]["batch"]
    share = (r.get("flop_model_step_ratio") or 1.0) if r["schedule"] == "alternate" else 1.0
    flops = train * sum(report["step_costs"]["flops"]) * share
    r["flops_per_s"] = flops / r["step_seconds"]
    rate = _rate(r["ranks"])
    r["utilisation"] = r["flops_per_s"] / rate if rate else None
    if r["kind"] not in ("pipeline", "pipelined"):
        floors = [x.get("conv_floor_seconds") for x in r["ranks"]]
        r["ceiling"] = flops / max(floors) / rate if rate and floors and None not in floors else None
        return
    parts = report["splits"].get(r["scheme"], {}).get("parts", [])
    key = "flops" if r["kind"] == "pipeline" else "flops_glued"  # by parts with its boundary prior, or fine-tuning
    for x, part in zip(r["ranks"], parts):
        busy, own, floor = x["busy_seconds_per_step"], x.get("conv_flops_per_s"), x.get("conv_floor_seconds")
        x["flops_per_s"] = train * part[key] / busy if busy else None
        x["utilisation"] = x["flops_per_s"] / own if own and x["flops_per_s"] else None
        x["ceiling"] = train * part[key] / floor / own if own and floor else None


def _add_compile_figures(r: dict, eager: dict | None) -> None:
    """A compiled run against its eager row: the speed-up, the compilation time and the steps that repay it."""
    r["compile_seconds"] = r["warmup_extra_seconds"] - (eager["warmup_extra_seconds"] if eager else 0.0)
    r["speedup_over_eager"] = eager["step_seconds"] / r["step_seconds"] if eager else None
    saved = eager["step_seconds"] - r["step_seconds"] if eager else 0.0
    # a warm inductor cache (a second run of the same model) compiles in about no time: nothing to repay
    r["amortised_after_steps"] = max(r["compile_seconds"], 0.0) / saved if saved > 0 else None


def _compile_targets(runs: list[dict], e2e: dict | None) -> list[dict]:
    """Issue 13's targets: the compiled e2e step >= 1.4x faster; utilisation >= 50 % end to end and per stage."""
    out = []
    compiled = next((r for r in runs if r["name"] == "e2e compiled"), None)
    if compiled and e2e:
        out.append({"target": "e2e step compiled >= 1.4x faster than eager", "run": compiled["name"],
                    "value": compiled["speedup_over_eager"], "threshold": 1.4,
                    "met": compiled["speedup_over_eager"] >= 1.4})
    for r in runs:
        if r["kind"] == "pipeline" and not r["bandwidth"] or r["name"] in ("e2e", "e2e compiled"):
            holders = r["ranks"] if r["kind"] == "pipeline" else [r]
            figures = [x.get("utilisation") for x in holders]
            if None in figures:
                continue
            ceilings = [x.get("ceiling") for x in holders]
            out.append({"target": "utilisation >= 50% of the convolution rate" + (
                " (the least busy-time figure of its stages)" if r["kind"] == "pipeline" else ""),
                "run": r["name"], "value": min(figures), "threshold": 0.5, "met": min(figures) >= 0.5,
                **({"note": "ceiling " + "/".join(f"{c:.0%}" for c in ceilings)} if None not in ceilings else {})})
    return out


def _add_ratios(r: dict, e2e: dict | None, splits: dict, P: int, threads: int) -> None:
    """A run's speed-up and step ratio to e2e, and the step ratios the FLOP and measured cost models predict."""
    from pipeflow.tools.flops import data_parallel_cost_ratio  # noqa: PLC0415

    r["speedup"] = r["images_per_s"] / e2e["images_per_s"] if e2e else None
    r["step_ratio"] = r["step_seconds"] / e2e["step_seconds"] if e2e else None
    split = splits.get(r.get("scheme")) or {}
    fm, mm = split.get("flop_model", {}), split.get("measured_model", {})
    if r["kind"] == "ddp":
        r["flop_model_step_ratio"] = data_parallel_cost_ratio(P)
    elif r["kind"] == "pipeline":
        r["flop_model_step_ratio"] = fm.get("pipeline_step")
        r["measured_model_step_ratio"] = mm.get("pipeline_step")
    elif r["schedule"] == "alternate":
        r["flop_model_step_ratio"] = fm.get("alternate_step")
        r["measured_model_step_ratio"] = mm.get("alternate_step")
    elif r["threads_per_rank"] == threads:
        r["flop_model_step_ratio"] = 1.0


def _predictions(runs: list[dict], cfg: Config, shape, P: int) -> dict:
    """The paper's plan (E1 epochs by parts, E2 end to end) against E1 + E2 epochs end to end:
    predicted and measured."""
    e1, e2 = cfg.train.by_parts_epochs, cfg.train.finetune_epochs
    pred: dict = {"by_parts_epochs": e1, "finetune_epochs": e2}
    alt = next((r for r in runs if r.get("schedule") == "alternate"), None)
    if alt:
        pred["alternate"] = _alternate_prediction(alt, e1, e2)
    if _paper_config(cfg, shape):
        pred["paper_plan_ratio"] = PAPER_PLAN[P]
        pred["paper_note"] = ("the paper measured 720 / 1026 min (2 parts) and 647 / 1020 min (3 parts) "
                              "for 60 by-parts + 30 end-to-end epochs against 90 end-to-end epochs")
    pipes = [r for r in runs if r["kind"] == "pipeline" and not r.get("bandwidth")]
    ddp = next((r for r in runs if r["kind"] == "ddp" and not r.get("bandwidth")), None)
    if pipes:
        pred["distributed"] = _distributed_prediction(min(pipes, key=lambda r: r["step_seconds"]), ddp, e1, e2, P)
    return pred


def _alternate_prediction(alt: dict, e1: int, e2: int) -> dict:
    """The alternate schedule on one device: its step and the whole plan relative to e2e."""
    from pipeflow.tools.flops import paper_plan_ratio  # noqa: PLC0415

    return {
        "scheme": alt["scheme"],
        "step_ratio": {"flop_model": alt.get("flop_model_step_ratio"),
                       "measured_cost_model": alt.get("measured_model_step_ratio"),
                       "measured": alt["step_ratio"]},
        "plan_ratio": {k: (paper_plan_ratio(v, e1, e2) if v is not None else None) for k, v in
                       (("flop_model", alt.get("flop_model_step_ratio")),
                        ("measured_cost_model", alt.get("measured_model_step_ratio")),
                        ("measured", alt["step_ratio"]))},
    }


def _distributed_prediction(best: dict, ddp: dict | None, e1: int, e2: int, P: int) -> dict:
    """The plan on P ranks: by parts on the fastest pipeline, then DDP fine-tuning."""
    from pipeflow.tools.flops import data_parallel_cost_ratio  # noqa: PLC0415

    ft_measured = ddp["step_ratio"] if ddp else None
    total = e1 + e2
    return {
        "scheme": best["scheme"], "finetune": "ddp",
        "step_ratio": {"flop_model": best.get("flop_model_step_ratio"), "measured": best["step_ratio"],
                       "ddp_measured": ft_measured, "ddp_flop_model": data_parallel_cost_ratio(P)},
        # (E1 pipeline epochs + E2 DDP epochs on P ranks) / (E1 + E2) end-to-end epochs on one device
        "plan_ratio_vs_one_device": {
            "flop_model": (e1 * best["flop_model_step_ratio"] + e2 * data_parallel_cost_ratio(P)) / total
            if total and best.get("flop_model_step_ratio") is not None else None,
            "measured": (e1 * best["step_ratio"] + e2 * ft_measured) / total if total and ft_measured else None},
        # ... against (E1 + E2) DDP epochs on the same P ranks
        "plan_ratio_vs_ddp": ((e1 * best["step_ratio"] + e2 * ft_measured) / (total * ft_measured)
                              if total and ft_measured else None),
    }


def _targets(report: dict, runs: list[dict], e2e: dict | None, P: int) -> list[dict]:
    """The issue's targets, each with its value and whether it was met here (not asserted anywhere)."""
    out = []
    if not e2e:
        return out
    threads = report["settings"]["threads_per_rank"]
    pipes = [r for r in runs if r["kind"] == "pipeline"]
    # a balanced split that cuts where another scheme does was run under that scheme's name
    splits = report["splits"]
    balanced_schemes = {splits[s]["same_as"] or s for s in ("balanced", "balanced-measured") if s in splits}
    balanced = [r for r in pipes if r["scheme"] in balanced_schemes] or pipes
    for bw in sorted({r["bandwidth"] for r in pipes}):
        at = [r for r in balanced if r["bandwidth"] == bw]
        if not at:
            continue
        best = max(at, key=lambda r: r["images_per_s"])
        link = f" (link {_fmt_bw(bw)})" if bw else ""
        if not bw:
            if P == 2 and threads == 1:
                best_any = max((r for r in pipes if not r["bandwidth"]), key=lambda r: r["images_per_s"])
                out.append({"target": "2 ranks x 1 thread >= 1.8x e2e (1 thread) images/s", "run": best_any["name"],
                            "value": best_any["speedup"], "threshold": 1.8, "met": best_any["speedup"] >= 1.8})
            out.append({"target": f"balanced split on {P} ranks >= 0.9 x {P} x e2e images/s", "run": best["name"],
                        "value": best["speedup"], "threshold": 0.9 * P, "met": best["speedup"] >= 0.9 * P})
            peak = max(x["peak_memory_bytes"] for x in best["ranks"])
            e2e_peak = e2e["ranks"][0]["peak_memory_bytes"]
            ratio = peak / e2e_peak if e2e_peak else None
            out.append({"target": f"peak memory per rank <= 1.1 x e2e's / {P}", "run": best["name"], "value": ratio,
                        "threshold": 1.1 / P, "met": ratio is not None and ratio <= 1.1 / P,
                        "note": f"max over ranks {peak / 2**20:.1f} MiB vs e2e {e2e_peak / 2**20:.1f} MiB "
                                f"(the looser reading, 1/{P} + 10% of e2e = {1 / P + 0.1:.2f}, "
                                f"{'met' if ratio is not None and ratio <= 1 / P + 0.1 else 'missed'})"})
        ddp = next((r for r in runs if r["kind"] == "ddp" and r["bandwidth"] == bw), None)
        if ddp:
            out.append({"target": f"balanced pipeline >= DDP images/s on the same {P} ranks{link}", "run": best["name"],
                        "value": best["images_per_s"] / ddp["images_per_s"], "threshold": 1.0,
                        "met": best["images_per_s"] >= ddp["images_per_s"]})
    alt = next((r for r in runs if r.get("schedule") == "alternate"), None)
    if alt:
        out.append({"target": "alternate step time <= 0.6 x e2e's (the paper's CIFAR-10 config)", "run": alt["name"],
                    "value": alt["step_ratio"], "threshold": 0.6, "met": alt["step_ratio"] <= 0.6,
                    "note": None if report["predictions"].get("paper_plan_ratio") else
                    "this config is not the paper's CIFAR-10 Glow: the threshold is the paper config's"})
    return out


def _pipelined_targets(runs: list[dict]) -> list[dict]:
    """Issue 12: the forward-only pipeline >= 1.2x the better of GPipe and 1F1B, with a lower peak per rank."""
    peers = [r for r in runs if r["kind"] == "pipelined"]
    pipes = [r for r in runs if r["kind"] == "pipeline" and not r["bandwidth"]]
    if not peers or not pipes:
        return []
    best, peer = max(pipes, key=lambda r: r["images_per_s"]), max(peers, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / peer["images_per_s"]
    peak = max(x["peak_memory_bytes"] for x in best["ranks"])
    peer_peak = min(max(x["peak_memory_bytes"] for x in r["ranks"]) for r in peers)
    return [{"target": "forward-only pipeline >= 1.2x the better of GPipe and 1F1B images/s", "run": best["name"],
             "value": ratio, "threshold": 1.2, "met": ratio >= 1.2, "note": f"against {peer['name']}"},
            {"target": "forward-only pipeline's peak memory per rank < GPipe's and 1F1B's", "run": best["name"],
             "value": peak / peer_peak if peer_peak else None, "threshold": 1.0, "met": peak < peer_peak,
             "note": f"busiest rank {peak / 2**20:.1f} MiB vs {peer_peak / 2**20:.1f} MiB (the lower of the two)"}]


# ---------------------------------------------------------------- on screen

def _f(x, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.1f}"


def _bytes(b) -> str:
    if not b:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def _measured_costs_shown(runs: list[dict]) -> bool:
    """Whether the runs table gets a column for the measured cost model's predictions."""
    return any(r.get("measured_model_step_ratio") is not None for r in runs)


def _run_columns(measured: bool) -> list[str]:
    return ["run", "ranks", "img/s", "speed-up", "step ms", "/e2e", "FLOPs", *(["costs"] if measured else []),
            "util", "ceiling", "compile s", "busy", "idle ms", "peak MiB", "fwd B", "bwd B"]


def _run_cells(r: dict, measured: bool, step_ms: str) -> list[str]:
    """One run's row of the runs table (``step_ms``: the format of its step time in milliseconds)."""
    ranks = r["ranks"]
    pipe = r["kind"] in ("pipeline", "pipelined")
    return [r["name"], f"{r['ranks_count']}x{r['threads_per_rank']}", f"{r['images_per_s']:.1f}",
            _f(r.get("speedup"), "{:.2f}x"), step_ms.format(1000 * r["step_seconds"]),
            _f(r.get("step_ratio"), "{:.3f}"),
            _f(r.get("flop_model_step_ratio"), "{:.3f}"),
            *([_f(r.get("measured_model_step_ratio"), "{:.3f}")] if measured else []),
            "/".join(_f(x.get("utilisation"), "{:.0%}") for x in ranks) if pipe else _f(r.get("utilisation"), "{:.0%}"),
            "/".join(_f(x.get("ceiling"), "{:.0%}") for x in ranks) if pipe else _f(r.get("ceiling"), "{:.0%}"),
            _f(r.get("compile_seconds"), "{:.0f}"),
            "/".join(_f(x["busy_fraction"], "{:.0%}") for x in ranks) if pipe else "-",
            "/".join(_f(x["idle_seconds_per_step"] * 1000, "{:.0f}") for x in ranks) if pipe else "-",
            "/".join(_mib(x["peak_memory_bytes"]) for x in ranks),
            _bytes(r.get("forward_bytes_per_rank_per_step")), _bytes(r.get("backward_bytes_per_rank_per_step"))]


def _split_cells(scheme: str, sp: dict, runs: list[dict]) -> list[str]:
    """One split's row: its cuts, each part's shares, and what each stage of its unthrottled pipeline run did."""
    run = next((r for r in runs if r.get("kind") == "pipeline" and r.get("scheme") == (sp["same_as"] or scheme)
                and not r.get("bandwidth") and not r.get("compiled") and "error" not in r), None)
    return [scheme + (f" (= {sp['same_as']})" if sp["same_as"] else ""), ",".join(map(str, sp["cuts"])),
            "/".join(f"{p['flop_share']:.0%}" for p in sp["parts"]),
            "/".join(_f(p["measured_share"], "{:.0%}") for p in sp["parts"]),
            "/".join(f"{x['busy_seconds_per_step'] * 1000:.0f}" for x in run["ranks"]) if run else "-",
            "/".join(f"{x['idle_seconds_per_step'] * 1000:.0f}" for x in run["ranks"]) if run else "-",
            f"{run['images_per_s']:.1f}" if run else "-"]


def render(report: dict, console) -> None:
    """Every table of the report on a rich console."""
    console.print(_runs_table(report))
    if report["splits"]:
        console.print(_splits_table(report))
    console.print(_predictions_table(report.get("predictions", {})))
    if report.get("targets"):
        console.print(_targets_table(report["targets"]))
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")
    m = report["machine"]
    console.print(f"[dim]load average before {m['load_before']}, after {m['load_after']} on {m['cpu_count']} CPUs; "
                  f"{report['seconds']:.0f} s[/dim]")


def _runs_table(report: dict):
    from rich.table import Table  # noqa: PLC0415

    s = report["settings"]
    runs = report["runs"]
    title = (f"pipeflow bench: {s['parts']} parts, batch {s['batch']}, {s['steps']} timed steps after {s['warmup']}, "
             f"{s['threads_per_rank']} thread(s) per device, {report['machine']['device']}")
    t = Table(title=title)
    measured = _measured_costs_shown(runs)
    cols = _run_columns(measured)
    for col in cols:
        t.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    for r in runs:
        if "error" in r:
            t.add_row(r["name"], *["" for _ in cols[2:]], "failed")
        else:
            t.add_row(*_run_cells(r, measured, "{:.1f}"))
    t.caption = ("ranks: processes x threads; a/b: rank 0/rank 1; speed-up: images/s over e2e's; /e2e: step time over "
                 "e2e's (P-rank pipeline: the slowest rank's interval between updates); FLOPs"
                 + (", costs" if measured else "") + ": that ratio as the FLOP model"
                 + (" and the measured step costs" if measured else "")
                 + " predict it; util: the FLOP model's FLOPs/s over the processes' rate on a 3x3 convolution of "
                 "the model's shape (a pipeline: each stage's over its busy time); ceiling: the most util could be, "
                 "the step's own convolutions each at its best measured rate and nothing else in the step (none for "
                 "alternate); compile s: compilation, the "
                 "compiled run's warm-up beyond its eager row's; busy: share of the time in updates; idle ms: per "
                 "step; peak: above the process's baseline; fwd, bwd B: the most any rank sends per step, forward "
                 "to the next stage or, for DDP, in the gradient all-reduce")
    return t


def _splits_table(report: dict):
    from rich.table import Table  # noqa: PLC0415

    st = Table(title="splits: the share of each part, and what each stage did on the P ranks")
    for col in ("scheme", "cuts", "FLOP share", "measured share", "stage busy ms/step", "idle ms/step", "images/s"):
        st.add_column(col, justify="right" if col != "scheme" else "left")
    for scheme, sp in report["splits"].items():
        st.add_row(*_split_cells(scheme, sp, report["runs"]))
    return st


def _predictions_table(pred: dict):
    from rich.table import Table  # noqa: PLC0415

    pt = Table(title=f"predictions: {pred.get('by_parts_epochs')} epochs by parts + {pred.get('finetune_epochs')} "
                     f"end to end, against all end to end")
    for col in ("quantity", "FLOP model", "cost model", "measured", "paper"):
        pt.add_column(col, justify="right" if col != "quantity" else "left")
    if "alternate" in pred:
        a = pred["alternate"]
        pt.add_row(f"alternate ({a['scheme']}) step / e2e step", _f(a["step_ratio"]["flop_model"], "{:.3f}"),
                   _f(a["step_ratio"]["measured_cost_model"], "{:.3f}"), _f(a["step_ratio"]["measured"], "{:.3f}"), "")
        pt.add_row("plan on one device / e2e", _f(a["plan_ratio"]["flop_model"], "{:.3f}"),
                   _f(a["plan_ratio"]["measured_cost_model"], "{:.3f}"), _f(a["plan_ratio"]["measured"], "{:.3f}"),
                   _f(pred.get("paper_plan_ratio"), "{:.3f}", ""))
    if "distributed" in pred:
        d = pred["distributed"]
        pt.add_row(f"pipeline ({d['scheme']}) on P ranks, step / e2e step", _f(d["step_ratio"]["flop_model"], "{:.3f}"),
                   "", _f(d["step_ratio"]["measured"], "{:.3f}"), "")
        pt.add_row("plan on P ranks (DDP fine-tuning) / e2e on one device",
                   _f(d["plan_ratio_vs_one_device"]["flop_model"], "{:.3f}"), "",
                   _f(d["plan_ratio_vs_one_device"]["measured"], "{:.3f}"), "")
        pt.add_row("plan on P ranks / DDP on P ranks", "", "", _f(d["plan_ratio_vs_ddp"], "{:.3f}"), "")
    return pt


def _targets_table(targets: list[dict]):
    from rich.table import Table  # noqa: PLC0415

    tt = Table(title="targets (informative: never asserted in tests)")
    for col in ("target", "run", "value", "threshold", "met"):
        tt.add_column(col, justify="left" if col in ("target", "run") else "right")
    for x in targets:
        tt.add_row(x["target"], x["run"], _f(x["value"], "{:.3f}"), f"{x['threshold']:.3f}",
                   "[green]yes[/green]" if x["met"] else "[red]no[/red]")
    return tt


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def to_markdown(report: dict) -> str:
    """The report's tables as Markdown (for docs/benchmarks.md)."""
    s, m = report["settings"], report["machine"]
    lines = [f"{s['parts']} parts, batch {s['batch']}, {s['steps']} timed steps after {s['warmup']}, "
             f"{s['threads_per_rank']} thread(s) per device, {m['device']}; load average "
             f"{m['load_before']} before, {m['load_after']} after ({m['cpu_count']} CPUs)", ""]
    lines += _markdown_runs(report["runs"])
    if report["splits"]:
        lines += ["", "| scheme | cuts | FLOP share | measured share | stage busy ms/step | idle ms/step | img/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_split_cells(scheme, sp, report["runs"])) + " |"
                  for scheme, sp in report["splits"].items()]
    rows = _markdown_prediction_rows(report.get("predictions", {}))
    if rows:
        lines += ["", "| prediction | FLOP model | cost model | measured | paper |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join([r[0], *(_f(x, "{:.3f}") for x in r[1:])]) + " |" for r in rows]
    if report.get("targets"):
        lines += ["", "| target | run | value | threshold | met |", "|---|---|---|---|---|"]
        lines += [f"| {x['target']} | {x['run']} | {_f(x['value'], '{:.3f}')} | {x['threshold']:.3f} | "
                  f"{'yes' if x['met'] else '**no**'} |" for x in report["targets"]]
    return "\n".join(lines) + "\n"


def _markdown_runs(runs: list[dict]) -> list[str]:
    measured = _measured_costs_shown(runs)
    head = _run_columns(measured)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} |")
        else:
            lines.append("| " + " | ".join(_run_cells(r, measured, "{:.0f}")) + " |")
    return lines


def _markdown_prediction_rows(pred: dict) -> list[list]:
    """``[quantity, FLOP model, cost model, measured, paper]`` for each prediction (None where there is none)."""
    rows = []
    if "alternate" in pred:
        a = pred["alternate"]
        rows.append([f"alternate ({a['scheme']}) step / e2e step", a["step_ratio"]["flop_model"],
                     a["step_ratio"]["measured_cost_model"], a["step_ratio"]["measured"], None])
        rows.append([f"plan ({pred['by_parts_epochs']} + {pred['finetune_epochs']} epochs) on one device / e2e",
                     a["plan_ratio"]["flop_model"], a["plan_ratio"]["measured_cost_model"], a["plan_ratio"]["measured"],
                     pred.get("paper_plan_ratio")])
    if "distributed" in pred:
        d = pred["distributed"]
        rows.append([f"pipeline ({d['scheme']}) on P ranks, step / e2e step", d["step_ratio"]["flop_model"], None,
                     d["step_ratio"]["measured"], None])
        rows.append(["plan on P ranks (DDP fine-tuning) / e2e on one device",
                     d["plan_ratio_vs_one_device"]["flop_model"], None, d["plan_ratio_vs_one_device"]["measured"],
                     None])
        rows.append(["plan on P ranks / DDP on P ranks", None, None, d["plan_ratio_vs_ddp"], None])
    return rows
