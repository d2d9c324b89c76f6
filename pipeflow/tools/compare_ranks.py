"""By parts on P ranks against data-parallel training on the same P ranks and against one device.

    results = compare_ranks(load_config("configs/demo_compare.toml"), ranks=2, out="runs/demo-compare")

The paper's gain that no epoch budget takes away comes from P devices: by parts, every part
trains on every batch at once and only activations travel forwards. This comparison trains, as
real processes (``torchrun ... -m pipeflow.launch``, and ``pipeflow train`` for one device):

    e2e                 end to end on one device (one process with one rank's threads: one of the P devices)
    ddpP                end to end, data-parallel (DDP) on P ranks: the same global batch
    pipelineP-<mode>    by parts on P ranks (one part each), then fine-tuning, <mode> being
                        distributed.finetune: ddp, rank0 or pipeline

with the same data, seed, initial weights, learning rate and epochs, and writes into ``out``:

    out/report.md, out/compare.json   the verdict at equal wall-clock and at the end, every figure
    out/plots/bpd.png                 test bits/dim against training seconds and against images seen

Noise is kept from deciding the verdict: with ``seeds=(0, 1)`` every run is trained once per
seed, the second seed in reverse order (A B B A), so that a machine slowing down or speeding
up during the comparison weighs on every run alike; CPU seconds (``getrusage`` of the child
processes) stand beside wall seconds; ``train.eval_ema`` adds the averaged weights' bits/dim.

A run that finished is reused, an interrupted one (its directory without ``summary.json``)
is resumed from its checkpoints with ``--resume auto``.

``bandwidth`` (bytes/s) paces every multi-rank run's link as ``pipeflow bench`` does: the
pipeline's forward sends and DDP's gradient all-reduces (``pipeflow.launch --bandwidth``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeflow.checkpoint import atomic_write_json
from pipeflow.config import Config, holds_config, to_toml, with_overrides
from pipeflow.errors import UserError
from pipeflow.tools.compare import CLAIM_BPD, END_TO_END, Log, _bpd_at, _load_avg, _torch_version, output_dir

FINETUNE_MODES = ("ddp", "rank0", "pipeline")
# Target 2 of the issue: by parts + fine-tuning within CLAIM_BPD of DDP in at most 0.8 of its wall-clock
# (over a slow link), and in at most 0.6 of one device's wall-clock (unthrottled).
TIME_AGAINST = {"ddp": 0.8, "e2e": 0.6}
RUN_FILE = "compare_run.json"  # what compare measured of a run beside its own summary


@dataclass(frozen=True)
class RankRun:
    """One kind of run of the comparison."""

    name: str  # e2e, ddp2, pipeline2-ddp, ...
    kind: str  # e2e (one device) | ddp | pipeline
    ranks: int  # processes
    finetune: str | None = None  # distributed.finetune of a pipeline run

    def key(self, seed: int, seeds: Sequence[int]) -> str:
        """The run's directory name: its name, and its seed when there are several."""
        return self.name if len(seeds) == 1 else f"{self.name}-seed{seed}"


def default_runs(ranks: int) -> list[str]:
    return ["e2e", f"ddp{ranks}", *(f"pipeline{ranks}-{mode}" for mode in FINETUNE_MODES)]


def parse_rank_runs(runs: str | Sequence[str] | None, ranks: int) -> list[RankRun]:
    """``"e2e,ddp2,pipeline2-ddp"`` -> the runs, for ``ranks`` processes (the names must say the same P)."""
    if ranks < 2:
        raise UserError(f"--ranks {ranks}: a comparison across ranks needs at least 2")
    names = default_runs(ranks) if runs is None else (
        [r.strip() for r in runs.split(",") if r.strip()] if isinstance(runs, str) else [str(r) for r in runs])
    if not names:
        raise UserError(f"--runs names no run; e.g. --runs {','.join(default_runs(ranks))}")
    parsed = [_run_named(name, ranks) for name in names]
    if len({r.name for r in parsed}) != len(parsed):
        raise UserError(f"--runs names a run twice: {','.join(names)}")
    return parsed


def _run_named(name: str, ranks: int) -> RankRun:
    if name == "e2e":
        return RankRun(name, "e2e", 1)
    if name == f"ddp{ranks}":
        return RankRun(name, "ddp", ranks)
    mode = name.removeprefix(f"pipeline{ranks}-")
    if mode != name and mode in FINETUNE_MODES:
        return RankRun(name, "pipeline", ranks, mode)
    raise UserError(f"unknown run {name!r} for --ranks {ranks}: use {', '.join(default_runs(ranks))}")


def parse_seeds(seeds: str | Sequence[int] | None, default: int) -> list[int]:
    if seeds is None:
        return [default]
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()] if isinstance(seeds, str) else [int(s) for s in seeds]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    if not values or len(set(values)) != len(values):
        raise UserError(f"--seeds must name one or more different seeds, got {seeds!r}")
    return values


def run_order(plan: Sequence[RankRun], seeds: Sequence[int]) -> list[tuple[RankRun, int]]:
    """Every run once per seed, every other seed in reverse order: A B C, C B A, A B C, ...

    With two seeds each run's mean position in time is the same, so a steady drift of the
    machine's speed adds the same to every run's mean time and cannot decide the verdict.
    """
    order = []
    for i, seed in enumerate(seeds):
        order += [(run, seed) for run in (plan if i % 2 == 0 else list(reversed(plan)))]
    return order


def threads_per_rank(cfg: Config, ranks: int) -> int:
    """Each rank's intra-op threads: ``train.threads``, or the machine's cores shared out."""
    return cfg.train.threads or max(1, (os.cpu_count() or 1) // ranks)


def rank_run_config(cfg: Config, run: RankRun, seed: int, threads: int, ranks: int) -> Config:
    """The config of one run: ``threads`` per process. One device is one of the P devices the ranks have:
    one process with one rank's threads (on CPUs, a model this small gains nothing from more threads)."""
    sets = [f"train.seed={seed}", f"train.threads={threads}"]
    if run.kind == "pipeline":
        sets += ["train.schedule=pipeline", f"parts.count={ranks}", f"distributed.finetune={run.finetune}"]
    else:
        sets += ["train.schedule=e2e", "parts.count=1", *END_TO_END]
    return with_overrides(cfg, sets)


def run_command(run: RankRun, config: Path, run_dir: Path, start: str, bandwidth: float) -> list[str]:
    """The command that trains ``run``: ``pipeflow train`` on one device, else torchrun and pipeflow.launch."""
    again = ["--resume", "auto"] if start == "resume" else ["--force"]
    if run.kind == "e2e":
        return [sys.executable, "-m", "pipeflow.cli", "train", "--config", str(config), "--out", str(run_dir),
                "--quiet", *again]
    paced = ["--bandwidth", str(bandwidth)] if bandwidth else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.ranks}",
            "-m", "pipeflow.launch", "--config", str(config), "--out", str(run_dir), *again, *paced]


def start_mode(run_dir: Path, run_cfg: Config, force: bool) -> str:
    """``reuse`` a run that finished with this config, ``resume`` one that was interrupted, else ``fresh``."""
    config = run_dir / "config.toml"
    same = holds_config(config, run_cfg)
    if force or not same:
        if not force and (run_dir / "summary.json").is_file():
            raise UserError(f"{run_dir} holds a finished run with another config; pass --force to train it again")
        return "fresh"
    return "reuse" if (run_dir / "summary.json").is_file() else "resume"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch_run(cmd: list[str], log_path: Path, timeout: float | None = None) -> dict:
    """Run one training command to its end; its exit status, wall and CPU seconds (every process it started)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    cpu0, wall0, load0 = _children_cpu(), time.perf_counter(), _load_avg()
    with open(log_path, "w") as sink:
        code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    return {"returncode": code, "process_wall_seconds": time.perf_counter() - wall0,
            "cpu_seconds": _children_cpu() - cpu0, "load_before": load0, "load_after": _load_avg()}


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def train_rank_run(run: RankRun, seed: int, run_cfg: Config, run_dir: Path, bandwidth: float, force: bool,
                   log: Log) -> dict:
    """Train (or reuse, or resume) one run of the comparison; its entry of the results."""
    start = start_mode(run_dir, run_cfg, force)
    entry = {"name": run.name, "kind": run.kind, "ranks": run.ranks, "finetune": run.finetune, "seed": seed,
             "run_dir": str(run_dir), "start": start, "bandwidth": bandwidth if run.kind != "e2e" else 0.0}
    if start == "reuse":
        measured = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
        log(f"{run_dir.name}: reusing the finished run in {run_dir}")
    else:
        config = run_dir.parent / f"{run_dir.name}.toml"
        config.write_text(to_toml(run_cfg))
        cmd = run_command(run, config, run_dir, start, bandwidth)
        log(f"{run_dir.name}: {'resuming' if start == 'resume' else 'training'} ({run.ranks} process"
            f"{'es' if run.ranks > 1 else ''}): {' '.join(cmd[1:])}")
        measured = {"command": " ".join(["python", *cmd[1:]]), "cpu_covers_last_attempt_only": start == "resume",
                    **launch_run(cmd, run_dir.parent / f"{run_dir.name}.log")}
        if measured["returncode"] != 0:
            tail = _tail(run_dir.parent / f"{run_dir.name}.log")
            log(f"{run_dir.name}: FAILED (exit status {measured['returncode']}): {tail}")
            return {**entry, **measured, "error": tail or f"exit status {measured['returncode']}", "test_bpd": None}
        atomic_write_json(run_dir / RUN_FILE, measured)
    summary = json.loads((run_dir / "summary.json").read_text())
    entry.update(measured)
    entry.update(_figures(summary, run_cfg))
    log(f"{run_dir.name}: test {entry['test_bpd']:.4f} bits/dim after {entry['train_seconds']:.1f} s of training")
    return entry


def _figures(summary: dict, run_cfg: Config) -> dict:
    """What a finished run measured, each evaluation with the images seen by then (global batch x steps)."""
    batch = run_cfg.train.batch_size
    history = [{**r, "images": r["step"] * batch} for r in summary["history"] if r.get("test_bpd") is not None]
    ema = [r["test_bpd_ema"] for r in history if r.get("test_bpd_ema") is not None]
    return {"test_bpd": summary["test_bpd"], "test_bpd_ema": ema[-1] if ema else None,
            "train_seconds": summary["train_seconds"], "wall_seconds": summary["wall_seconds"],
            "steps": summary["steps"], "images": summary["steps"] * batch, "resumed_from_step":
            summary.get("resumed_from_step"), "phases": summary["phases"], "comm": summary.get("comm"),
            "history": history}


def compare_ranks(cfg: Config, ranks: int, out: str | Path, runs: str | Sequence[str] | None = None,
                  seeds: str | Sequence[int] | None = None, bandwidth: float = 0.0, work_dir: str | Path | None = None,
                  force: bool = False, log: Log | None = None, command: str | None = None) -> dict:
    """Train every run of ``runs`` for every seed in A B B A order; write the report into ``out``.

    Returns the results dict that is also written to ``out/compare.json``.
    """
    from pipeflow.tools.compare_ranks_report import write_report  # noqa: PLC0415

    log = log or (lambda _msg: None)
    out = output_dir(out)
    if bandwidth < 0:
        raise UserError("--bandwidth must be 0 (unthrottled) or a positive number of bytes/s")
    plan, seed_list = parse_rank_runs(runs, ranks), parse_seeds(seeds, cfg.train.seed)
    threads = threads_per_rank(cfg, ranks)
    order = run_order(plan, seed_list)
    configs = {run.key(seed, seed_list): rank_run_config(cfg, run, seed, threads, ranks) for run, seed in order}
    work = Path(work_dir) if work_dir is not None else out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": command, "ranks": ranks, "seeds": seed_list, "bandwidth": bandwidth,
               "threads_per_rank": threads, "one_device_threads": threads,
               "order": [run.key(seed, seed_list) for run, seed in order], "config": cfg.to_dict(),
               "machine": {"cpus": os.cpu_count(), "torch": _torch_version()}, "load": {"start": _load_avg()},
               "work_dir": str(work), "runs": {}}
    out.mkdir(parents=True, exist_ok=True)
    for position, (run, seed) in enumerate(order):
        key = run.key(seed, seed_list)
        entry = train_rank_run(run, seed, configs[key], work / key, bandwidth, force, log)
        results["runs"][key] = {**entry, "position": position}
        write_report(results, out, final=False)  # after every run: a killed comparison keeps what it measured
    results["load"]["end"] = _load_avg()
    write_report(results, out, final=True)
    log(f"wrote {out / 'report.md'} and {out / 'compare.json'}")
    return results


# --- the verdict --------------------------------------------------------------------------------


def verdict(results: dict) -> dict:
    """Each run against the others at equal wall-clock and at the end, per kind averaged over the seeds."""
    runs = {k: e for k, e in results["runs"].items() if e.get("test_bpd") is not None}
    for seed in results["seeds"]:
        mine = [e for e in runs.values() if e["seed"] == seed]
        equal = min((e["train_seconds"] for e in mine), default=None)  # every run of this seed has got this far
        for e in mine:
            e["equal_seconds"] = equal
            e["bpd_at_equal_seconds"] = _bpd_at(e["history"], equal, "train_seconds")
    kinds: dict[str, dict] = {}
    for e in runs.values():
        kinds.setdefault(e["name"], []).append(e)
    table = {name: _mean_of(entries) for name, entries in kinds.items()}
    for name, row in table.items():
        for base in ("e2e", f"ddp{results['ranks']}"):
            ref = table.get(base)
            if ref is None or name == base:
                continue
            against = "ddp" if base.startswith("ddp") else "e2e"
            row[f"vs_{against}"] = _against(row, ref, TIME_AGAINST[against])
    return table


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_of(entries: list[dict]) -> dict:
    keys = ("test_bpd", "test_bpd_ema", "train_seconds", "wall_seconds", "process_wall_seconds", "cpu_seconds",
            "bpd_at_equal_seconds", "equal_seconds")
    return {"seeds": [e["seed"] for e in entries], **{k: _mean([e.get(k) for e in entries]) for k in keys},
            "test_bpd_per_seed": [e["test_bpd"] for e in entries]}


def _against(row: dict, ref: dict, time_limit: float) -> dict:
    """One kind against a baseline: bits/dim and time at the end, bits/dim at equal wall-clock."""
    diff = row["test_bpd"] - ref["test_bpd"]
    ratio = row["train_seconds"] / ref["train_seconds"] if ref["train_seconds"] else None
    cpu = row["cpu_seconds"] / ref["cpu_seconds"] if row["cpu_seconds"] and ref["cpu_seconds"] else None
    at_equal = (row["bpd_at_equal_seconds"] - ref["bpd_at_equal_seconds"]
                if None not in (row["bpd_at_equal_seconds"], ref["bpd_at_equal_seconds"]) else None)
    ema = row["test_bpd_ema"] - ref["test_bpd_ema"] if None not in (row["test_bpd_ema"], ref["test_bpd_ema"]) else None
    return {"bpd_diff": diff, "bpd_diff_ema": ema, "time_ratio": ratio, "cpu_ratio": cpu,
            "bpd_diff_at_equal_seconds": at_equal,
            "bpd_within": diff <= CLAIM_BPD, "time_limit": time_limit,
            "held": bool(diff <= CLAIM_BPD and ratio is not None and ratio <= time_limit)}
