"""``make gpu-check``: the CUDA path, measured once on real GPUs (at most 10 minutes on one H200).

    python -m pipeflow.tools.gpu_check [--steps 300] [--out docs/benchmarks/gpu]

Trains ``configs/cifar10_glow.toml`` for a few hundred steps in each schedule through the bench
workers (``pipeflow bench``: e2e, alternate, and every part on every batch on one device), and
records the alternate/e2e step ratio against the FLOP model and the paper's 0.70 (2 parts) and
0.63 (3 parts), each run's peak CUDA memory (``max_memory_allocated``), and each run's
utilisation beside its ceiling (what its own convolutions allow, :mod:`pipeflow.tools.conv_floor`).
With 2 or more GPUs it also runs the P-rank pipeline and DDP under torch's launcher (each part's
own peak memory is then its rank's). It writes one JSON file under ``--out``.

Without CUDA it stops at once with one line (exit status 2). ``--device cpu --tiny`` runs the
same logic on a tiny model, for the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeflow.errors import EXIT_USAGE, UserError

ROOT = Path(__file__).resolve().parent.parent.parent
PAPER_ALTERNATE_RATIO = {2: 720 / 1026, 3: 647 / 1020}  # 0.70 and 0.63: the paper's wall-time ratios
TINY = ["model.levels=2", "model.steps=2", "model.hidden=8", "data.dataset=digits", "data.n_bits=0",
        "train.batch_size=16"]
DATA = [ROOT / "shared" / "data" / "cifar10.npz", Path("/work/shared/data/cifar10.npz")]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeflow.tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10_glow.toml")
    p.add_argument("--steps", type=int, default=300, help="timed steps of each run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the digits (a dry run of the logic)")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 as an .npz (default: shared/data if present)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "gpu")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds allowed to each run")
    return p


def overrides(args, gpus: int) -> list[str]:
    """The config's settings for this check: the device, and the data found offline."""
    sets = [f"train.device={args.device}"]
    if args.tiny:
        return sets + TINY
    data = args.data or next((p for p in DATA if p.is_file()), None)
    if data is not None:
        sets += ["data.dataset=npz", f"data.path={data}"]
    return sets


def summarize(report: dict, parts: int, gpus: int) -> dict:
    """The figures the check is for, out of a bench report."""
    runs = {r["name"]: r for r in report["runs"]}
    alt = next((r for r in report["runs"] if r.get("schedule") == "alternate" and "error" not in r), None)
    pipes = [r for r in report["runs"] if r.get("kind") == "pipeline" and "error" not in r]
    return {
        "alternate_over_e2e": {
            "measured": alt and alt.get("step_ratio"),
            "flop_model": alt and alt.get("flop_model_step_ratio"),
            "paper": PAPER_ALTERNATE_RATIO.get(parts),
        },
        "peak_memory_bytes": {name: r.get("peak_memory_bytes") for name, r in runs.items() if "error" not in r},
        # each part on its own GPU: its rank's peak, beside the FLOP model's share of the work per part
        "pipeline_peak_memory_bytes_per_part": {r["name"]: [x["peak_memory_bytes"] for x in r["ranks"]] for r in pipes},
        "flop_model": (report.get("splits", {}).get(alt["scheme"]) or {}).get("flop_model") if alt else None,
        # issue 13 on the GPU: each run's utilisation of the convolution rate, and the most its convolutions allow
        "utilisation_and_ceiling": {name: _utilisation(r) for name, r in runs.items() if "error" not in r},
        "errors": {name: r["error"] for name, r in runs.items() if "error" in r},
        "gpus": gpus,
    }


def _utilisation(run: dict) -> list:
    """[utilisation, ceiling] of a run; of each rank, for a pipeline (its ceiling is per stage)."""
    if run.get("kind") in ("pipeline", "pipelined"):
        return [[x.get("utilisation"), x.get("ceiling")] for x in run["ranks"]]
    return [run.get("utilisation"), run.get("ceiling")]


def check(args) -> dict:
    import torch  # noqa: PLC0415

    from pipeflow.config import load_config  # noqa: PLC0415
    from pipeflow.tools.bench import BenchOptions, bench  # noqa: PLC0415

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("needs a CUDA device and torch sees none (torch.cuda.is_available() is False)")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    cfg = load_config(args.config, overrides(args, gpus))
    modes = ["e2e", "alternate", "pipeline-1dev"] + (["pipeline", "ddp"] if gpus >= cfg.parts.count else [])
    opts = BenchOptions(steps=args.steps, warmup=args.warmup, modes=modes, schemes=[cfg.parts.scheme],
                        timeout_s=args.timeout)
    started = time.time()
    report = bench(cfg, opts, log=lambda line: print(line, flush=True))
    return {"check": summarize(report, cfg.parts.count, gpus), "seconds": time.time() - started,
            "device": report["machine"].get("gpu") or args.device, "torch": torch.__version__,
            "config": str(args.config), "tiny": args.tiny, "bench": report}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = check(args)
    except UserError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["check"], indent=1, default=str))
    print(f"wrote {path}")
    return 0 if not result["check"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
