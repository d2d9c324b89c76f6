"""The ``pipeflow`` command line: train, plan, eval, sample (and bench, compare).

Every command turns :class:`~pipeflow.errors.UserError` into one line on stderr and exit
status 2; nothing the user can fix ends in a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

try:  # typer carries its own copy of click since 0.2x
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from pipeflow.errors import EXIT_USAGE, UserError
from pipeflow.progress import make_console



class OneLineUsageErrors(TyperGroup):
    """The errors typer finds itself (an unknown option, a value under an option's minimum) as the same one
    line as pipeflow's own, instead of a boxed usage message."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:
            if exc.format_message():  # no command given: the help (rich has printed it already)
                exc.show()
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            command = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            print(f"pipeflow: error: {exc.format_message()}{command}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("pipeflow: aborted", file=sys.stderr)
            sys.exit(1)
        # standalone_mode=False hands back an Exit's status as an int, a finished command's value as it is
        sys.exit(code if type(code) is int else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Glow normalizing flows by parts: gradient-isolated pieces, one per device.")
console = make_console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (defaults apply to what it leaves out).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value (repeatable).")


def user_errors(fn):
    """Bad input: one clear line, exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"pipeflow: error: {exc}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def _config(config: Optional[Path], overrides: Optional[List[str]], extra: tuple[str, ...] = ()):
    from pipeflow.config import load_config  # noqa: PLC0415

    return load_config(config, [*(overrides or []), *extra])


@app.command()
@user_errors
def train(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run directory."),
    schedule: Optional[str] = typer.Option(None, help="Shortcut for --set train.schedule=..."),
    force: bool = typer.Option(False, "--force", help="Replace a run already in --out."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue the run in --out from its newest "
                                         "checkpoint (or start it if it has none)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Train on one device (the single-device simulation of the pipeline)."""
    import contextlib  # noqa: PLC0415

    from pipeflow.glow.invconv import SingularWeightError  # noqa: PLC0415
    from pipeflow.part_trainer import TrainingDiverged  # noqa: PLC0415
    from pipeflow.progress import TrainingDisplay  # noqa: PLC0415
    from pipeflow.train import train as run_training  # noqa: PLC0415

    if resume not in (None, "auto"):
        raise UserError(f"--resume takes 'auto' (continue from the newest checkpoint in --out), not {resume!r}")
    cfg = _config(config, set_, (f"train.schedule={schedule}",) if schedule else ())
    display = TrainingDisplay(console, cfg, enabled=not quiet)
    with contextlib.ExitStack() as shown:
        def on_step(record: dict) -> None:  # the bar starts with the first step: bad input before it is one line
            if not display.task:
                shown.enter_context(display)
            display.on_step(record)

        try:
            summary = run_training(cfg, out, force=force, on_step=on_step, on_epoch=display.on_epoch,
                                   resume=resume == "auto")
        except (TrainingDiverged, SingularWeightError) as exc:  # a failure at run time: status 1, no traceback
            shown.close()
            print(f"pipeflow: failed: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None
    if summary.get("already_finished"):
        print(f"the run in {out} has already finished; nothing to resume")
    display.closing_table(summary, out)


@app.command()
@user_errors
def plan(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
         json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON.")):
    """Show how the model is cut: layers, shapes, parameters and FLOP share of each part, per scheme."""
    from pipeflow.data import dataset_shape  # noqa: PLC0415
    from pipeflow.build import build_model  # noqa: PLC0415
    from pipeflow.tools.plan import render_plan  # noqa: PLC0415

    cfg = _config(config, set_)
    report = render_plan(cfg, build_model(cfg, dataset_shape(cfg.data)), make_console())
    if json_out:
        json_out.write_text(json.dumps(report, indent=2, default=list))


@app.command("eval")
@user_errors
def eval_(checkpoint: Path = typer.Option(..., "--checkpoint", help="A model.pt written by a run."),
          set_: Optional[List[str]] = SetOpt,
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON.")):
    """Test-set bits/dim of a saved model (the data section of its config, with --set overrides)."""
    from pipeflow.checkpoint import load_model  # noqa: PLC0415
    from pipeflow.config import with_overrides  # noqa: PLC0415
    from pipeflow.data import load_dataset, n_bins, test_batches  # noqa: PLC0415
    from pipeflow.loop import evaluate  # noqa: PLC0415
    from pipeflow.part_trainer import PartTrainer  # noqa: PLC0415
    from pipeflow.parts import whole_model_part  # noqa: PLC0415
    from pipeflow.build import resolve_device  # noqa: PLC0415

    model, cfg, bins = load_model(checkpoint)
    cfg = with_overrides(cfg, set_ or [])
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data)
    if tuple(data.shape) != tuple(model.input_shape):
        raise UserError(f"the data's images {data.shape} do not fit the model's input {model.input_shape}")
    if n_bins(data, cfg.data.n_bits) != bins:
        raise UserError(f"the data has {n_bins(data, cfg.data.n_bits)} levels per pixel, "
                        f"the model was trained on {bins}")
    model.to(device)
    c, h, w = model.input_shape
    trainer = PartTrainer(whole_model_part(model), 1.0, cfg.train, c * h * w, bins)
    bpd = evaluate([trainer], test_batches(data, cfg.data, cfg.train.eval_batch_size), device)[-1]
    print(f"test bits/dim: {bpd:.4f}  ({len(data.x_test)} images of {data.name})")
    if json_out:
        json_out.write_text(json.dumps({"test_bpd": bpd, "checkpoint": str(checkpoint), "images": len(data.x_test)}))
    return bpd


@app.command()
@user_errors
def sample(checkpoint: Path = typer.Option(..., "--checkpoint", help="A model.pt written by a run."),
           out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG file for the grid."),
           n: int = typer.Option(64, "--n", min=1, help="Number of samples."),
           temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0),
           seed: int = typer.Option(0, "--seed")):
    """Draw a grid of samples from a saved model."""
    import torch  # noqa: PLC0415
    from torchvision.utils import save_image  # noqa: PLC0415

    from pipeflow.checkpoint import load_model  # noqa: PLC0415
    from pipeflow.runlog import pixels  # noqa: PLC0415

    model, _, _ = load_model(checkpoint)
    images = model.sample(n, temperature, torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(pixels(images), out, nrow=max(1, int(n**0.5)))
    print(f"wrote {n} samples at temperature {temperature} to {out}")


@app.command()
@user_errors
def compare(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o",
                             help="Directory for report.md, compare.json, plots/, samples/."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Comma-separated runs: e2e and <schedule><parts>, "
                                       "e.g. e2e,alternate2,pipeline3 "
                                       "(default: e2e, alternate2/3, pipeline2/3, sequential2); with --ranks P: "
                                       "e2e, ddpP, pipelineP-ddp, pipelineP-rank0, pipelineP-pipeline (default: all)."),
    ranks: Optional[int] = typer.Option(None, "--ranks", help="P >= 2: by parts on P ranks against DDP on P ranks and "
                                        "one device, as real processes (torchrun)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="With --ranks: every run once per seed, e.g. 0,1, "
                                        "in A B B A order (default: train.seed)."),
    bandwidth: float = typer.Option(0.0, "--bandwidth", help="With --ranks: pace the pipeline's sends to BYTES_PER_S "
                                    "(DDP's all-reduces are not paced)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir",
                                            help="Where the runs themselves go (default: --out/<run>)."),
    force: bool = typer.Option(False, "--force", help="Train every run again instead of reusing finished ones."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """End-to-end against by parts (same data, seed, epochs): bits/dim, wall-clock, plots, samples, report."""
    import shlex  # noqa: PLC0415
    import time  # noqa: PLC0415

    from pipeflow.tools.compare import compare as run_compare  # noqa: PLC0415

    def log(message: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False, highlight=False)

    cfg = _config(config, set_)
    command = "pipeflow compare " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "compare" else None
    if ranks is not None or seeds is not None or bandwidth:
        return _compare_ranks(cfg, ranks, out, runs, seeds, bandwidth, work_dir, force, None if quiet else log, command)
    results = run_compare(cfg, out, runs=runs, work_dir=work_dir, force=force,
                          log=None if quiet else log, command=command)
    table = Table(title=f"pipeflow compare in {out}")
    for col in ("run", "by-parts bpd", "final bpd", "diff", "train s", "time / e2e", "claim"):
        table.add_column(col, justify="right")
    for name, e in results["runs"].items():
        if e.get("test_bpd") is None:
            table.add_row(name, "failed", "", "", "", "", "")
            continue
        fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
        table.add_row(name, fmt(e.get("by_parts_test_bpd"), "{:.4f}"), f"{e['test_bpd']:.4f}",
                      fmt(e.get("bpd_diff"), "{:+.4f}"), f"{e['train_seconds']:.1f}",
                      fmt(e.get("time_ratio"), "{:.3f}"),
                      {True: "held", False: "no", None: "-"}[e.get("claim_held")])
    held = results["claim"].get("held")
    table.caption = (f"claim: {results['claim']['text']} -- "
                     f"{'held' if held else 'not held' if held is not None else 'not checked'} (alternate runs)")
    make_console().print(table)
    print(f"report: {out / 'report.md'}")


def _compare_ranks(cfg, ranks, out, runs, seeds, bandwidth, work_dir, force, log, command) -> None:
    """``pipeflow compare --ranks P``: the runs side by side, bits/dim and seconds."""
    from pipeflow.tools.compare_ranks import compare_ranks  # noqa: PLC0415

    if ranks is None:
        raise UserError("--seeds and --bandwidth go with --ranks P (a comparison across P ranks)")
    results = compare_ranks(cfg, ranks, out, runs=runs, seeds=seeds, bandwidth=bandwidth, work_dir=work_dir,
                            force=force, log=log, command=command)
    table = Table(title=f"pipeflow compare --ranks {ranks} in {out}")
    for col in ("run", "final bpd", "EMA bpd", "train s", "CPU s", "bpd at equal wall-clock", "vs DDP",
                "vs one device"):
        table.add_column(col, justify="right")
    fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    for name, row in results["verdict"].items():
        vs = [fmt(row[k]["bpd_diff"], "{:+.4f}") + fmt(row[k]["time_ratio"], " / {:.2f}x") if row.get(k) else "-"
              for k in ("vs_ddp", "vs_e2e")]
        table.add_row(name, fmt(row["test_bpd"], "{:.4f}"), fmt(row["test_bpd_ema"], "{:.4f}"),
                      fmt(row["train_seconds"], "{:.1f}"), fmt(row["cpu_seconds"], "{:.1f}"),
                      fmt(row["bpd_at_equal_seconds"], "{:.4f}"), *vs)
    table.caption = "bits/dim: lower is better; vs: bits/dim difference / training-time ratio (means over the seeds)"
    make_console().print(table)
    print(f"report: {out / 'report.md'}")


@app.command()
@user_errors
def bench(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    parts: Optional[int] = typer.Option(None, "--parts", "-p", min=2,
                                        help="P: parts, and ranks of the distributed runs (default: parts.count)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed steps of every run."),
    warmup: int = typer.Option(3, "--warmup", min=2, help="Untimed steps before them (memory: over the first two)."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", min=1,
                                        help="Images per step (default: train.batch_size)."),
    threads: int = typer.Option(1, "--threads", min=1,
                                help="Intra-op threads per device: e2e gets this many, each of the P ranks too."),
    bandwidth: Optional[List[float]] = typer.Option(
        None, "--bandwidth", help="Throttle every rank's link to BYTES_PER_S (pipeline sends and DDP all-reduce "
        "alike); repeat to compare several; 0: unthrottled."),
    scheme: Optional[str] = typer.Option(
        None, "--scheme", help="Split schemes of the P-rank pipeline, comma-separated: blocks, across, balanced, "
        "balanced-measured, cuts (default: configured, then blocks, across, balanced)."),
    measure_costs: bool = typer.Option(
        False, "--measure-costs", help="Measure every flow step's training cost on the device: adds the "
        "balanced-measured split and the measured cost model."),
    cost_repeats: int = typer.Option(5, "--cost-repeats", min=1,
                                     help="Timed calls per flow step when measuring costs (the fastest counts)."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Comma-separated subset of runs: e2e, e2e-threads, alternate, pipeline-1dev, ddp, "
        "pipeline, gpipe, 1f1b (end to end, one part per rank, distributed.microbatches)."),
    compile_: bool = typer.Option(False, "--compile", help="Also run each of them with train.compile, beside its "
                                  "eager row (compilation timed apart from the steps)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every figure to this JSON file."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the tables as Markdown."),
    keep: Optional[Path] = typer.Option(None, "--keep",
                                        help="Keep the workers' specs, logs and raw results in this folder."),
    timeout: float = typer.Option(1800.0, "--timeout", min=1.0, help="Seconds allowed to each run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """Throughput, memory and traffic of e2e, DDP, alternate and the P-rank pipeline, side by side."""
    import shlex  # noqa: PLC0415
    import time  # noqa: PLC0415

    from pipeflow.tools.bench import BenchOptions, parse_modes, parse_schemes, render, to_markdown  # noqa: PLC0415
    from pipeflow.tools.bench import bench as run_bench  # noqa: PLC0415
    from pipeflow.tools.bench import write_json  # noqa: PLC0415

    def log(message: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False, highlight=False)

    cfg = _config(config, set_)
    opts = BenchOptions(parts=parts, steps=steps, warmup=warmup, batch=batch, threads=threads,
                        bandwidths=list(bandwidth) if bandwidth else [0.0], schemes=parse_schemes(scheme),
                        measure_costs=measure_costs, cost_repeats=cost_repeats, modes=parse_modes(only),
                        timeout_s=timeout, keep=keep, compile=compile_)
    command = "pipeflow " + shlex.join(sys.argv[1:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else None
    report = run_bench(cfg, opts, log=None if quiet else log, command=command)
    render(report, make_console(min_width=160))
    if json_out:
        write_json(report, json_out)
        print(f"wrote {json_out}")
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(to_markdown(report))
        print(f"wrote {markdown}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
