"""End-to-end against by parts, on the same data, seed and epoch budget: the paper's claim, measured.

    results = compare(load_config("configs/mnist_compare.toml"), "docs/results/mnist", work_dir="runs/compare")

trains every run of ``runs`` (default: :data:`DEFAULT_RUNS`) with :func:`pipeflow.train.train`,
each into ``work_dir/<run>/`` (``out/<run>/`` without a work dir), then writes into ``out``:

    out/report.md         the claim, whether it held, the table, the FLOP prediction, plots, samples
    out/compare.json      every figure of the report, and each run's eval history
    out/plots/*.png       test bits/dim against training wall-clock and against epochs (needs matplotlib)
    out/samples/<run>.png the last sample grid of each run

A run is named ``e2e`` (the baseline: ``by_parts_epochs + finetune_epochs`` epochs end to end) or
``<schedule><parts>`` with schedule ``alternate``, ``pipeline`` or ``sequential``: that many epochs by
parts, then ``finetune_epochs`` end to end. Runs that already finished with the same config are
reused, and one that was interrupted (no ``summary.json``) resumes from its checkpoints, so an
interrupted comparison continues where it stopped when run again.

Wall-clock is the ``train_seconds`` of each run (training steps only: no evaluation, no sampling).
On a shared machine it is noisy, so the CPU time of the training steps (``time.process_time``)
and the load average before and after each run are recorded beside it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from pipeflow.checkpoint import atomic_write_bytes, atomic_write_json, json_safe
from pipeflow.config import Config, holds_config, with_overrides
from pipeflow.errors import UserError
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.part_trainer import TrainingDiverged

BASELINE = "e2e"
DEFAULT_RUNS = ("e2e", "alternate2", "alternate3", "pipeline2", "pipeline3", "sequential2")
BY_PARTS_SCHEDULES = ("alternate", "pipeline", "sequential")
CLAIM_BPD = 0.02  # "within 0.02 bits/dim of the end-to-end test bpd"
CLAIM_TIME = 0.75  # "in at most 75% of the wall-clock"
CLAIM = ("by-parts + fine-tuning reaches the end-to-end test bpd within {bpd} in at most {time:.0%} "
         "of the wall-clock on one device").format(bpd=CLAIM_BPD, time=CLAIM_TIME)
PAPER = ("CIFAR-10, Glow L=3 K=32: end-to-end 3.60 bpd in 1026 min; 2 parts across blocks (60 epochs alternate "
         "by parts + 30 end to end) 3.61 bpd in 720 min (70%)")
EXTRA_FILE = "compare_run.json"  # what compare measures beside a run's own summary

Log = Callable[[str], None]


def parse_runs(runs: str | Sequence[str] | None) -> list[tuple[str, str, int]]:
    """``"e2e,alternate2"`` -> ``[(name, schedule, parts), ...]``; the e2e baseline always comes first."""
    if runs is None:
        names = list(DEFAULT_RUNS)
    elif isinstance(runs, str):
        names = [r.strip() for r in runs.split(",") if r.strip()]
    else:
        names = [str(r).strip() for r in runs]
    if not names:
        raise UserError("--runs names no run; e.g. --runs e2e,alternate2")
    parsed = []
    for name in names:
        if name == BASELINE:
            parsed.append((name, "e2e", 1))
            continue
        match = re.fullmatch(rf"({'|'.join(BY_PARTS_SCHEDULES)})(\d+)", name)
        if not match or int(match.group(2)) < 2:
            raise UserError(f"unknown run {name!r}: use e2e or <schedule><parts> with schedule one of "
                            f"{', '.join(BY_PARTS_SCHEDULES)} and parts >= 2, e.g. alternate2")
        parsed.append((name, match.group(1), int(match.group(2))))
    if len({n for n, _, _ in parsed}) != len(parsed):
        raise UserError(f"--runs names a run twice: {','.join(names)}")
    parsed.sort(key=lambda r: r[0] != BASELINE)
    if parsed[0][0] != BASELINE:
        parsed.insert(0, (BASELINE, "e2e", 1))
    return parsed


# What an end-to-end run leaves out of the by-parts config it is compared with: it has no parts to feed or
# to find rates for (it trains at train.lr).
END_TO_END = ("train.feed_ema=0", "train.find_lr_steps=0")


def run_config(cfg: Config, schedule: str, parts: int) -> Config:
    """The config of one run: ``cfg`` with its schedule and number of parts."""
    return with_overrides(cfg, [f"train.schedule={schedule}", f"parts.count={parts}",
                                *(END_TO_END if schedule == "e2e" else ())])


class _CpuClock:
    """CPU time of the training steps only, from the trainer's callbacks.

    Each step is charged the CPU time since the end of the step before it (``after_step``, which
    comes after any mid-epoch checkpoint), so checkpoint writes are left out as they are from
    ``train_seconds``. The first step of the run and of every epoch has no such mark before it
    (evaluation, sampling and the epoch's checkpoint come between): it is charged the mean of the others.
    """

    def __init__(self):
        self.mark: float | None = None
        self.last_step = -1
        self.total = 0.0
        self.counted = 0
        self.history: list[float | None] = []  # CPU seconds of training at each evaluation

    def on_step(self, record: dict) -> None:
        now = time.process_time()
        if record["step"] != self.last_step:
            if self.mark is not None:
                self.total += now - self.mark
                self.counted += 1
            self.last_step = record["step"]
        elif self.mark is not None:  # another part of the same step (pipeline)
            self.total += now - self.mark
        self.mark = now

    def after_step(self, step: int) -> None:
        self.mark = time.process_time()

    def on_epoch(self, record: dict) -> None:
        self.mark = None
        self.history.append(self.seconds(record["step"]))

    def seconds(self, steps: int) -> float | None:
        return self.total * steps / self.counted if self.counted else None


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _first_time_within(history: list[dict], target: float, key: str = "train_seconds") -> float | None:
    """Training seconds (``key``) at the first evaluation whose test bpd is at most ``target``."""
    for record in history:
        if record["test_bpd"] <= target:
            return record.get(key)
    return None


def _bpd_at(history: list[dict], x: float | None, key: str) -> float | None:
    """The test bpd of a run at ``x`` seconds of training (linear between evaluations; None before the first)."""
    points = [(r[key], r["test_bpd"]) for r in history if r.get(key) is not None]
    if x is None or not points or x < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def _predicted(cfg: Config, schedule: str, parts: int) -> dict | None:
    """FLOP-model prediction of the run's time relative to end-to-end (pipeline: the same work plus the
    boundary priors)."""
    from pipeflow.data import dataset_shape  # noqa: PLC0415
    from pipeflow.tools.flops import paper_plan_ratio, part_flops, part_step_costs  # noqa: PLC0415
    from pipeflow.tools.plan import predicted_ratios, scheme_parts  # noqa: PLC0415
    from pipeflow.schedules import active_parts  # noqa: PLC0415
    from pipeflow.build import build_model  # noqa: PLC0415

    if schedule == "e2e":
        return {"step": 1.0, "plan": 1.0}
    model = build_model(cfg, dataset_shape(cfg.data))
    cut = scheme_parts(cfg, model, cfg.parts.scheme, parts)
    t = cfg.train
    if schedule == "alternate":
        ratios = predicted_ratios(cfg, model, cut)
        return {"step": ratios["alternate_step"], "plan": ratios["plan"]}
    trained, handed = part_flops(model, cut), part_flops(model, cut, with_priors=False)
    if schedule == "pipeline":  # every part trains on every batch, each with its boundary prior (e2e runs none)
        step = sum(trained) / (sum(handed[:-1]) + trained[-1])
    else:  # sequential: part k trains (earlier parts forward only) for its share of the epochs
        cost = part_step_costs(trained, handed)
        epochs = max(t.by_parts_epochs, 1)
        step = sum(cost[active_parts("sequential", parts, e, 0, epochs, 0)[0]] for e in range(epochs)) / epochs
    return {"step": step, "plan": paper_plan_ratio(step, t.by_parts_epochs, t.finetune_epochs)}


def _last_samples(run_dir: Path) -> Path | None:
    grids = list((run_dir / "samples").glob("*.png"))
    if not grids:
        return None

    def epoch(p: Path) -> int:
        m = re.search(r"epoch(\d+)$", p.stem)
        return int(m.group(1)) if m else -1

    return max(grids, key=lambda p: (epoch(p), p.stat().st_mtime))


def _finished(run_dir: Path, run_cfg: Config) -> dict | None:
    """The summary of a run already finished in ``run_dir`` with exactly ``run_cfg``; None if unfinished.

    A finished run with another config is an error: it is not ours to replace without --force.
    """
    summary, config = run_dir / "summary.json", run_dir / "config.toml"
    if not summary.is_file():
        return None  # never started, or interrupted before the end: train it (again)
    if not holds_config(config, run_cfg):
        raise UserError(f"{run_dir} holds a finished run with another config; pass --force to train it again")
    try:
        return json.loads(summary.read_text())
    except json.JSONDecodeError:
        return None


def _train_one(name: str, run_cfg: Config, run_dir: Path, force: bool, log: Log) -> tuple[dict, dict, bool]:
    """Train (or reuse) one run. Returns ``(summary, extra measurements, reused)``."""
    from pipeflow.train import train  # noqa: PLC0415

    if not force:
        summary = _finished(run_dir, run_cfg)
        if summary is not None:
            extra_path = run_dir / EXTRA_FILE
            extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
            log(f"{name}: reusing the finished run in {run_dir} (test {_f(summary['test_bpd'])} bits/dim)")
            return summary, extra, True
    clock = _CpuClock()

    def on_epoch(record: dict) -> None:
        clock.on_epoch(record)
        log(f"{name}: {record['phase']} epoch {record['epoch']}: test {record['test_bpd']:.4f} bits/dim "
            f"after {record['train_seconds']:.1f} s of training")

    load_before = _load_avg()
    # A run dir without summary.json is a run that was interrupted: with the same config it continues from its
    # checkpoints; with another (or with force), it is ours to replace.
    config = run_dir / "config.toml"
    resume = not force and holds_config(config, run_cfg)
    log(f"{name}: {'resuming' if resume else 'training'} into {run_dir} (load average {load_before})")
    summary = train(run_cfg, run_dir, force=not resume, resume=resume, on_step=clock.on_step, on_epoch=on_epoch,
                    after_step=clock.after_step)
    # resumed: CPU seconds of the steps this invocation made, scaled to all the run's steps; so are those of the
    # evaluations it has no count for (brought back by its checkpoint, which head its history, or made before a step)
    history = summary["history"]
    counted = [None] * max(len(history) - len(clock.history), 0) + clock.history
    cpu_history = [c if c is not None else clock.seconds(r["step"]) for r, c in zip(history, counted)]
    extra = {"cpu_seconds": clock.seconds(summary["steps"]), "cpu_history": cpu_history,
             "load_before": load_before, "load_after": _load_avg(), "resumed_from_step": summary["resumed_from_step"]}
    atomic_write_json(run_dir / EXTRA_FILE, extra)
    return summary, extra, False


def output_dir(out: str | Path) -> Path:
    """A comparison's output folder: refused if a file stands there (it is created when written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    return out


def compare(cfg: Config, out: str | Path, runs: str | Sequence[str] | None = None, work_dir: str | Path | None = None,
            force: bool = False, log: Log | None = None, command: str | None = None) -> dict:
    """Train every run in ``runs`` on ``cfg``'s data, seed and epoch budget; write the report into ``out``.

    Returns the results dict that is also written to ``out/compare.json``.
    """
    log = log or (lambda _msg: None)
    out = output_dir(out)
    work = Path(work_dir) if work_dir is not None else out
    plan = parse_runs(runs)
    if cfg.train.run_epochs < 1:
        raise UserError("train.by_parts_epochs + train.finetune_epochs must be at least 1 to compare anything")
    configs = {name: run_config(cfg, schedule, parts) for name, schedule, parts in plan}  # every error before training
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = _new_results(cfg, command, work)
    for name, schedule, parts in plan:
        entry = _run_entry(name, schedule, parts, configs[name], work / name, force, log)
        results["runs"][name] = entry
        if "error" not in entry:
            _finish(results)  # after every run, so a killed comparison still leaves what it measured
            _write(out, results, started)

    results["load"]["end"] = _load_avg()
    results["samples"] = _copy_samples(results, out)
    results["plots"] = _plots(results, out, log)
    _finish(results)
    _write(out, results, started, final=True)
    log(f"wrote {out / 'report.md'} and {out / 'compare.json'}")
    return results


def _new_results(cfg: Config, command: str | None, work: Path) -> dict:
    """The results before any run: the claim, the budget, the config and the machine."""
    t = cfg.train
    return {
        "claim": {"text": CLAIM, "bpd_tolerance": CLAIM_BPD, "time_fraction": CLAIM_TIME, "paper": PAPER},
        "baseline": BASELINE,
        "command": command,
        "epochs": {"by_parts": t.by_parts_epochs, "finetune": t.finetune_epochs,
                   "e2e": t.run_epochs},
        "config": cfg.to_dict(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": _torch_version(), "threads": t.threads},
        "load": {"start": _load_avg()},
        "work_dir": str(work),
        "runs": {},
    }


def _run_entry(name: str, schedule: str, parts: int, run_cfg: Config, run_dir: Path, force: bool, log: Log) -> dict:
    """Train (or reuse) one run; its entry of the results. A run that diverged is recorded with its error."""
    entry = {"name": name, "schedule": schedule, "parts": parts, "run_dir": str(run_dir)}
    try:
        summary, extra, reused = _train_one(name, run_cfg, run_dir, force, log)
    except (TrainingDiverged, SingularWeightError) as exc:  # e.g. the sequential ablation: record it, compare the rest
        log(f"{name}: FAILED: {exc}")
        entry.update({"error": str(exc), "test_bpd": None})
        return entry
    summary = json_safe(summary)  # a fresh run's non-finite figures as null, like a reused run's
    if summary["test_bpd"] is None:
        log(f"{name}: FAILED: its final test bits/dim is not finite")
        entry.update({"error": "the final test bits/dim is not finite", "test_bpd": None})
        return entry
    entry.update(_measured(summary, extra, reused))
    entry["predicted"] = _predicted(run_cfg, schedule, parts)
    return entry


def _measured(summary: dict, extra: dict, reused: bool) -> dict:
    """What one finished run measured: bits/dim, seconds per phase, CPU time, load, and its eval history."""
    phases = summary["phases"]
    cpu_history = extra.get("cpu_history") or []
    for i, record in enumerate(summary["history"]):
        record["cpu_seconds"] = cpu_history[i] if i < len(cpu_history) else None
    history = [r for r in summary["history"] if r["test_bpd"] is not None]  # plots need numbers
    return {
        "test_bpd": summary["test_bpd"],
        "by_parts_test_bpd": phases.get("by_parts", {}).get("test_bpd"),
        "train_seconds": summary["train_seconds"],
        "by_parts_seconds": phases.get("by_parts", {}).get("seconds"),
        "finetune_seconds": phases.get("finetune", phases.get("e2e", {})).get("seconds"),
        "wall_seconds": summary["wall_seconds"],
        "cpu_seconds": extra.get("cpu_seconds"),
        "load_before": extra.get("load_before"),
        "load_after": extra.get("load_after"),
        "steps": summary["steps"],
        "skipped_steps": summary["skipped_steps"],
        "cuts": summary["cuts"],
        "reused": reused,
        "history": history,
    }


def _torch_version() -> str:
    import torch  # noqa: PLC0415

    return torch.__version__


def _finish(results: dict) -> None:
    """Ratios and differences to the baseline, per-run claim checks and the verdict."""
    runs = results["runs"]
    base = runs.get(BASELINE, {})
    base_bpd, base_s, base_cpu = base.get("test_bpd"), base.get("train_seconds"), base.get("cpu_seconds")
    target = base_bpd + CLAIM_BPD if base_bpd is not None else None
    for entry in runs.values():
        if entry.get("test_bpd") is None or base_bpd is None:
            entry.update({"time_ratio": None, "cpu_ratio": None, "bpd_diff": None, "claim_held": None})
            continue
        entry["time_ratio"] = entry["train_seconds"] / base_s if base_s else None
        entry["cpu_ratio"] = entry["cpu_seconds"] / base_cpu if entry.get("cpu_seconds") and base_cpu else None
        entry["bpd_diff"] = entry["test_bpd"] - base_bpd
        entry["seconds_to_target"] = _first_time_within(entry["history"], target)
        reached = entry["seconds_to_target"]
        entry["fraction_to_target"] = reached / base_s if reached and base_s else None
        entry["cpu_to_target"] = _first_time_within(entry["history"], target, "cpu_seconds")
        entry["e2e_bpd_at_same_time"] = _bpd_at(base["history"], entry["train_seconds"], "train_seconds")
        entry["e2e_bpd_at_same_cpu"] = _bpd_at(base["history"], entry.get("cpu_seconds"), "cpu_seconds")
        if entry["name"] == BASELINE:
            entry["claim_held"] = None
            continue
        within = entry["bpd_diff"] <= CLAIM_BPD
        fast = entry["time_ratio"] is not None and entry["time_ratio"] <= CLAIM_TIME
        entry["bpd_within"], entry["time_within"] = within, fast
        entry["claim_held"] = bool(within and fast)
        cpu = entry["cpu_ratio"]
        entry["claim_held_cpu"] = bool(within and cpu is not None and cpu <= CLAIM_TIME) if cpu is not None else None
    checked = {n: e["claim_held"] for n, e in runs.items() if n != BASELINE and e.get("claim_held") is not None}
    paper = {n: held for n, held in checked.items() if n.startswith("alternate")}
    results["claim"]["per_run"] = checked
    results["claim"]["alternate"] = paper
    results["claim"]["held"] = (all(paper.values()) if paper else None)
    results["claim"]["held_any"] = any(checked.values()) if checked else None


def _copy_samples(results: dict, out: Path) -> dict:
    """Copy the last sample grid of every run into ``out/samples/<run>.png``."""
    copied = {}
    for name, entry in results["runs"].items():
        grid = _last_samples(Path(entry["run_dir"]))
        if grid is None:
            continue
        target = out / "samples" / f"{name}.png"
        if grid.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)
        entry["sample"] = f"samples/{name}.png"
        entry["sample_from"] = grid.name
        copied[name] = entry["sample"]
    return copied


STYLE = {"e2e": ("black", "-"), "alternate": ("tab:blue", "-"), "pipeline": ("tab:green", "--"),
         "sequential": ("tab:red", ":")}


def _plots(results: dict, out: Path, log: Log) -> list[str]:
    """Test bits/dim against training seconds and against epochs; skipped without matplotlib.

    Each figure has two panels: the whole curves (clipped above at the typical first evaluation),
    and a zoom on the final stretch, where the 0.02 band of the claim can be seen.
    """
    plt = _pyplot()
    if plt is None:
        note = "matplotlib is not installed: plots skipped (pip install 'pipeflow[plots]')"
        log(f"note: {note}")
        results["plots_note"] = note
        return []
    runs = [e for e in results["runs"].values() if e.get("history")]
    if not runs:
        return []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    limits = _bpd_limits(runs)
    kinds = [("time", "train_seconds", "training wall-clock (s)")]
    if all(r.get("cpu_seconds") is not None for e in runs for r in e["history"]):
        kinds.append(("cpu", "cpu_seconds", "training CPU time (s)"))
    kinds.append(("epoch", "epoch", "epoch"))
    return [_plot(plt, results, runs, kind, key, xlabel, limits, out) for kind, key, xlabel in kinds]


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    return plt


def _bpd_limits(runs: list[dict]) -> tuple[float, float, float]:
    """``(low, high, zoom_high)``: the bpd range of the full panel (clipped above at the typical first
    evaluation) and the top of the zoom on the final stretch."""
    finals = [e["test_bpd"] for e in runs]
    values = [r["test_bpd"] for e in runs for r in e["history"]]
    firsts = sorted(e["history"][0]["test_bpd"] for e in runs)
    low = min(values)
    high = min(max(values), max(max(finals) + 0.05, firsts[len(firsts) // 2]))
    zoom_high = max(finals) + max(0.05, 0.3 * (max(finals) - low))
    return low, high, zoom_high


def _plot(plt, results: dict, runs: list[dict], kind: str, key: str, xlabel: str,
          limits: tuple[float, float, float], out: Path) -> str:
    """One figure, test bpd against ``key``: the whole curves and a zoom; written into ``out/plots``."""
    low, high, zoom_high = limits
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    xmax = 0.0
    for ax in axes:
        xmax = max(xmax, _draw_curves(ax, runs, key))
        _draw_claim(ax, results, kind, key)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    full, zoom = axes
    pad = 0.05 * max(high - low, 0.01)
    full.set_ylim(low - pad, high + pad)
    full.set_ylabel("test bits/dim")
    full.set_title(f"test bits/dim against {xlabel.split(' (')[0]} (circle: end of by parts)", fontsize=10)
    full.legend(fontsize=8)
    zpad = 0.05 * max(zoom_high - low, 0.01)
    zoom.set_ylim(low - zpad, zoom_high + zpad)
    zoom.set_xlim(0.45 * xmax, 1.02 * xmax)
    zoom.set_title("zoom on the final stretch", fontsize=10)
    fig.tight_layout()
    path = out / "plots" / f"bpd_vs_{kind}.png"
    fig.savefig(path)
    plt.close(fig)
    return f"plots/{path.name}"


def _draw_curves(ax, runs: list[dict], key: str) -> float:
    """Each run's test bpd against ``key``, a circle where its by-parts phase ends; returns the largest x."""
    xmax = 0.0
    for e in runs:
        color, dash = STYLE.get(e["schedule"], ("tab:gray", "-"))
        if e["parts"] > 2 and e["schedule"] in ("alternate", "pipeline"):
            color = {"alternate": "tab:purple", "pipeline": "tab:olive"}[e["schedule"]]
        xs = [r[key] for r in e["history"]]
        ys = [r["test_bpd"] for r in e["history"]]
        xmax = max(xmax, max(xs))
        ax.plot(xs, ys, dash, color=color, marker=".", label=f"{e['name']} ({e['test_bpd']:.3f})")
        by_parts = [i for i, r in enumerate(e["history"]) if r["phase"] == "by_parts"]
        if by_parts and len(by_parts) < len(e["history"]):
            i = by_parts[-1]
            ax.plot([xs[i]], [ys[i]], "o", color=color, mfc="none", ms=9)
    return xmax


def _draw_claim(ax, results: dict, kind: str, key: str) -> None:
    """The claim's lines: e2e final bpd + the tolerance, the time fraction of e2e's, the end of by parts."""
    base = results["runs"].get(BASELINE, {})
    if base.get("test_bpd") is None:
        return
    ax.axhline(base["test_bpd"] + CLAIM_BPD, color="gray", lw=0.8, ls="--", label=f"e2e final + {CLAIM_BPD}")
    if kind != "epoch" and base.get(key):
        ax.axvline(CLAIM_TIME * base[key], color="gray", lw=0.8, ls="-.", label=f"{CLAIM_TIME:.0%} of e2e time")
    if kind == "epoch" and results["epochs"]["finetune"] and results["epochs"]["by_parts"]:
        ax.axvline(results["epochs"]["by_parts"], color="gray", lw=0.6, ls=":")


def _write(out: Path, results: dict, started: float, final: bool = False) -> None:
    results["elapsed_seconds"] = time.time() - started
    results["complete"] = final
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)  # strict JSON, in run order
    atomic_write_bytes(out / "compare.json", (text + "\n").encode())
    atomic_write_bytes(out / "report.md", render_report(results).encode())


def _f(x, fmt="{:.4f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _yes(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


def render_report(results: dict) -> str:
    """The markdown report, from the results dict alone."""
    runs = results["runs"]
    lines = _header(results)
    lines += _verdict(results)
    lines += _table(runs)
    lines += _equal_time(runs)
    lines += _prediction(runs, results)
    lines += _by_parts_alone(runs, results["epochs"])
    lines += _sequential(runs, results["epochs"])
    lines += _load(runs, results)
    lines += _curves(results)
    lines += _samples(results)
    return "\n".join(lines)


def _header(results: dict) -> list[str]:
    """The title, the claim, the paper's figures, the setting and the command that reproduces the report."""
    claim, ep, cfg = results["claim"], results["epochs"], results["config"]
    lines = ["# End-to-end against by parts: the paper's claim, measured", ""]
    if not results.get("complete"):
        lines += ["**Incomplete**: the comparison is still running or was interrupted; run the command again "
                  "to continue it.", ""]
    m, d, tr = cfg["model"], cfg["data"], cfg["train"]
    schedule = tr.get("lr_schedule", "constant")  # (absent from the configs of older results)
    rate = f"lr {tr['lr']}" + ("" if schedule == "constant" else f" ({schedule} schedule)")
    data = d["path"] if d["dataset"] == "npz" else d["dataset"]
    lines += [
        f"**Claim checked:** {claim['text']}.",
        "",
        f"*Paper:* {claim['paper']}.",
        "",
        f"**Setting:** data `{data}` (train limit {d['train_limit'] or 'all'}, test limit {d['test_limit'] or 'all'}); "
        f"Glow L={m['levels']} K={m['steps']} hidden={m['hidden']} ({m['coupling']}); "
        f"parts scheme `{cfg['parts']['scheme']}`; "
        f"batch {tr['batch_size']}, {tr['steps_per_epoch'] or 'all'} steps per epoch, {rate}, "
        f"warm-up {tr['warmup_steps']} steps, alternate_every {tr['alternate_every']}, seed {tr['seed']}, "
        f"torch threads {tr['threads'] or 'default'}. "
        f"By-parts runs: {ep['by_parts']} epochs by parts + {ep['finetune']} end to end; "
        f"e2e: {ep['e2e']} epochs end to end. Same data, seed and initial weights for every run.",
        "",
    ]
    if results.get("command"):
        lines += ["Reproduce with:", "", "```bash", results["command"], "```", ""]
    return lines


def _verdict(results: dict) -> list[str]:
    """The claim run by run, how much the e2e bpd still moved at the end, and the paper's schedule's tally."""
    runs, base = results["runs"], results["runs"].get(BASELINE, {})
    lines = ["## Verdict", ""]
    if base.get("test_bpd") is None:
        return lines + ["The end-to-end baseline did not finish, so the claim cannot be checked.", ""]
    lines += [f"End-to-end: **{base['test_bpd']:.4f}** bits/dim in {base['train_seconds']:.1f} s of training "
              f"({_f(base.get('cpu_seconds'), '{:.1f}')} s of CPU time).", ""]
    lines += [f"- `{name}`: " + _run_verdict(e) for name, e in runs.items() if name != BASELINE]
    lines.append("")
    lines += _e2e_noise(base)
    paper = results["claim"].get("alternate") or {}
    if paper:
        held = [n for n, h in paper.items() if h]
        lines.append(f"**For the paper's schedule (alternate), the claim held for {len(held)} of {len(paper)} runs"
                     f"{' (' + ', '.join(held) + ')' if held else ''}.**")
        lines.append("")
    return lines


def _run_verdict(e: dict) -> str:
    """Whether the claim held for one run, and why: bpd, time, CPU time, and when it first came within reach."""
    if e.get("test_bpd") is None:
        return f"failed ({e.get('error', 'no result')})."
    verdict = "**held**" if e["claim_held"] else "**did not hold**"
    within = "within" if e["bpd_within"] else "not within"
    why = [f"bpd {e['test_bpd']:.4f} ({e['bpd_diff']:+.4f}, {within} {CLAIM_BPD})",
           f"time {e['train_seconds']:.1f} s = {e['time_ratio']:.1%} of e2e "
           f"({'at most' if e['time_within'] else 'more than'} {CLAIM_TIME:.0%})"]
    if e.get("cpu_ratio") is not None:
        why.append(f"CPU time {e['cpu_ratio']:.1%} of e2e (with CPU time for wall-clock the claim "
                   f"{'holds' if e['claim_held_cpu'] else 'does not hold'})")
    if e.get("fraction_to_target") is not None:
        why.append(f"first within {CLAIM_BPD} of the e2e final bpd after {e['seconds_to_target']:.1f} s "
                   f"({e['fraction_to_target']:.1%} of the e2e time)")
    else:
        why.append(f"never within {CLAIM_BPD} of the e2e final bpd at an evaluation")
    return f"{verdict}: " + "; ".join(why) + "."


def _e2e_noise(base: dict) -> list[str]:
    """How much the e2e test bpd still moved from epoch to epoch over its last third: what the tolerance means."""
    steps = [abs(b["test_bpd"] - a["test_bpd"]) for a, b in zip(base["history"], base["history"][1:])]
    tail = steps[-max(1, len(steps) // 3):] if steps else []
    if not tail:
        return []
    return [f"How much to read into {CLAIM_BPD}: over its last {len(tail)} evaluations the e2e test bpd "
            f"still moved by up to {max(tail):.4f} from one epoch to the next "
            f"(mean {sum(tail) / len(tail):.4f}).", ""]


def _curves(results: dict) -> list[str]:
    if results.get("plots"):
        return (["## Curves", "",
                 "Test bits/dim after every epoch. The circle marks the end of the by-parts phase; the dashed "
                 f"line is the e2e final bpd + {CLAIM_BPD}, the dash-dotted one {CLAIM_TIME:.0%} of the e2e time.", ""]
                + [f"![{p}]({p})" for p in results["plots"]] + [""])
    if results.get("plots_note"):
        return ["## Curves", "", f"*{results['plots_note']}.*", ""]
    return []


def _samples(results: dict) -> list[str]:
    samples = results.get("samples")
    if not samples:
        return []
    temperature = results["config"]["train"]["temperature"]
    return ["## Samples", "", f"The last sample grid of each run (temperature {temperature}).", "",
            "| " + " | ".join(samples) + " |", "|" + " --- |" * len(samples),
            "| " + " | ".join(f"![{n}]({p})" for n, p in samples.items()) + " |", ""]


def _table(runs: dict) -> list[str]:
    head = ("run", "parts", "schedule", "test bpd after by-parts", "final test bpd", "diff to e2e",
            "train s", "time / e2e", "CPU s", "CPU / e2e", "claim")
    lines = ["## Results", "", "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for name, e in runs.items():
        if e.get("test_bpd") is None:
            lines.append(f"| {name} | {e['parts']} | {e['schedule']} | failed | | | | | | | |")
            continue
        lines.append("| " + " | ".join([
            name, str(e["parts"]), e["schedule"], _f(e.get("by_parts_test_bpd")), _f(e["test_bpd"]),
            _f(e.get("bpd_diff"), "{:+.4f}"), _f(e["train_seconds"], "{:.1f}"), _f(e.get("time_ratio"), "{:.3f}"),
            _f(e.get("cpu_seconds"), "{:.1f}"), _f(e.get("cpu_ratio"), "{:.3f}"), _yes(e.get("claim_held"))]) + " |")
    lines += ["", "*train s*: seconds of training steps (`train_seconds`; evaluation and sampling excluded). "
              "*CPU s*: process CPU time of the same steps, less sensitive to other load on the machine. "
              "*claim*: final bpd within 0.02 of e2e and train s at most 75% of e2e.", ""]
    return lines


def _equal_time(runs: dict) -> list[str]:
    """Each run's final bpd against the e2e curve at the same training time (is by parts better per second?)."""
    rows = [(n, e) for n, e in runs.items() if n != BASELINE and e.get("test_bpd") is not None]
    if not rows:
        return []
    lines = ["## At equal training time", "",
             "Each run's final test bpd against the e2e curve at the same amount of training (linear between the "
             "e2e evaluations; *-* when the run ended before the first e2e evaluation). Negative: by parts is "
             "ahead of e2e for the time spent.", "",
             "| run | final bpd | train s | e2e bpd at that train s | diff | CPU s | e2e bpd at that CPU s | diff |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in rows:
        at_t, at_c = e.get("e2e_bpd_at_same_time"), e.get("e2e_bpd_at_same_cpu")
        lines.append("| " + " | ".join([
            name, _f(e["test_bpd"]), _f(e["train_seconds"], "{:.1f}"), _f(at_t),
            _f(e["test_bpd"] - at_t if at_t is not None else None, "{:+.4f}"), _f(e.get("cpu_seconds"), "{:.1f}"),
            _f(at_c), _f(e["test_bpd"] - at_c if at_c is not None else None, "{:+.4f}")]) + " |")
    lines.append("")
    return lines


def _prediction(runs: dict, results: dict) -> list[str]:
    lines = ["## Time: measured against the FLOP model", "",
             "`pipeflow.tools.plan.predicted_ratios`: an alternate step trains one part, runs the parts before it "
             "under no_grad and skips the ones after it; a pipeline step on one device does all the work of an e2e "
             "step. *Step* is the predicted cost of a by-parts step relative to an e2e step, *plan* the predicted time "
             "of the whole run relative to e2e.", "",
             "| run | predicted step | predicted plan | measured by-parts step | measured time / e2e |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    base = runs.get(BASELINE, {})
    base_step = base["train_seconds"] / base["steps"] if base.get("steps") else None
    for name, e in runs.items():
        if name == BASELINE or e.get("predicted") is None:
            continue
        measured_step = None
        if base_step and e.get("by_parts_seconds") is not None and e.get("steps"):
            by_steps = e["steps"] * results["epochs"]["by_parts"] / max(results["epochs"]["e2e"], 1)
            measured_step = e["by_parts_seconds"] / by_steps / base_step if by_steps else None
        lines.append(f"| {name} | {e['predicted']['step']:.3f} | {e['predicted']['plan']:.3f} | "
                     f"{_f(measured_step, '{:.3f}')} | {_f(e.get('time_ratio'), '{:.3f}')} |")
    lines += ["", "*Measured by-parts step*: seconds per step of the by-parts phase over seconds per e2e step.", ""]
    return lines


def _at_epoch(entry: dict, epoch: int) -> float | None:
    for r in entry.get("history", []):
        if r["epoch"] == epoch:
            return r["test_bpd"]
    return None


def _by_parts_alone(runs: dict, ep: dict) -> list[str]:
    base = runs.get(BASELINE, {})
    if not ep["by_parts"] or base.get("test_bpd") is None:
        return []
    base_at = _at_epoch(base, ep["by_parts"])
    lines = ["## The by-parts phase alone (no fine-tuning)", "",
             f"After {ep['by_parts']} epochs, e2e is at {_f(base_at)} bits/dim (final after {ep['e2e']}: "
             f"{base['test_bpd']:.4f}).", ""]
    for name, e in runs.items():
        if name == BASELINE or e.get("by_parts_test_bpd") is None:
            continue
        gap = e["by_parts_test_bpd"] - base["test_bpd"]
        gap_same = e["by_parts_test_bpd"] - base_at if base_at is not None else None
        gain = e["by_parts_test_bpd"] - e["test_bpd"]
        first_ft = next((r["test_bpd"] for r in e["history"] if r["phase"] == "finetune"), None)
        lines.append(f"- `{name}`: {e['by_parts_test_bpd']:.4f} bits/dim after the by-parts phase "
                     f"({_f(gap_same, '{:+.4f}')} against e2e after the same epochs, {gap:+.4f} against e2e final) "
                     f"in {e['by_parts_seconds']:.1f} s; {_f(first_ft)} after the first fine-tuning epoch; "
                     f"fine-tuning gained {gain:.4f} in all.")
    lines.append("")
    return lines


def _sequential(runs: dict, ep: dict) -> list[str]:
    seq = {n: e for n, e in runs.items() if e["schedule"] == "sequential"}
    if not seq:
        return []
    lines = ["## The sequential ablation", "",
             "Part 1 trains alone for the first 1/P of the by-parts epochs, then part 2, ...; a part never sees "
             "the later changes of the parts before it until fine-tuning.", ""]
    for name, e in seq.items():
        if e.get("test_bpd") is None:
            lines.append(f"- `{name}` failed: {e.get('error')}.")
            continue
        curve = ", ".join(f"{r['test_bpd']:.3f}" for r in e["history"] if r["phase"] == "by_parts")
        alt = runs.get(f"alternate{e['parts']}", {})
        cmp_alt = ""
        if alt.get("by_parts_test_bpd") is not None:
            cmp_alt = (f" (alternate{e['parts']}: {alt['by_parts_test_bpd']:.4f} after by parts, "
                       f"{alt['test_bpd']:.4f} final)")
        lines.append(f"- `{name}`: test bpd after each by-parts epoch: {curve}; {_f(e['by_parts_test_bpd'])} "
                     f"after by parts, {e['test_bpd']:.4f} after fine-tuning ({_f(e.get('bpd_diff'), '{:+.4f}')} "
                     f"to e2e){cmp_alt}; {e['skipped_steps']} steps skipped for non-finite losses.")
    lines.append("")
    return lines


def _load(runs: dict, results: dict) -> list[str]:
    cpus = results["machine"]["cpus"]
    rows = [(n, e.get("load_before"), e.get("load_after"), e.get("reused")) for n, e in runs.items()]
    total = sum(e.get("wall_seconds") or 0.0 for e in runs.values())
    lines = ["## Machine and load", "",
             f"{cpus} CPUs, {results['machine']['platform']}, Python {results['machine']['python']}, "
             f"torch {results['machine']['torch']}, {results['machine']['threads'] or 'default'} torch thread(s). "
             f"Load average (1, 5, 15 min) when this invocation started: {results['load'].get('start')}, "
             f"when it ended: {results['load'].get('end', '-')}. The {len(runs)} runs took {total / 60:.1f} min "
             "of wall-clock in all (training, evaluation, sampling); the load around each run is below.", "",
             "| run | load before | load after | reused from an earlier invocation |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {b} | {a} | {_yes(r)} |" for n, b, a, r in rows]
    busy = [n for n, b, a, _ in rows if any(x and x[0] > (cpus or 1) - 0.5 for x in (b, a))]
    lines += [""]
    if busy:
        lines += [f"**Load caveat:** the 1-minute load average reached the number of CPUs around {', '.join(busy)}: "
                  "other processes competed for the CPUs, so wall-clock figures are noisy; the CPU-time columns are "
                  "the steadier measure of work.", ""]
    return lines
