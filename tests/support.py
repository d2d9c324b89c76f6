"""What the tests share: one tiny config (with named variants), the ways a user runs pipeflow (the CLI
in-process or in a subprocess, ``pipeflow.launch`` under torchrun), and what a test checks of a result
(success, a one-line refusal, a run directory left untouched, two runs' parameters and metrics).

Every test file builds its configs from :data:`TINY`, so a change to the tiny model is made once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# one intra-op thread per process (the models are tiny, the cores shared); a wide console for the tables
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", "PYTHONPATH": str(ROOT)}

# --- the tiny config -------------------------------------------------------------------------------

# Small enough that a whole train -> eval -> sample round trip takes a few seconds on 2 cores.
TINY: dict[str, dict] = {
    "model": {"levels": 2, "steps": 2, "hidden": 8},
    "data": {"dataset": "digits", "test_limit": 64},
    "parts": {"count": 2, "scheme": "across"},
    "train": {"schedule": "pipeline", "by_parts_epochs": 1, "finetune_epochs": 1, "batch_size": 16,
              "eval_batch_size": 64, "lr": 1e-3, "warmup_steps": 2, "steps_per_epoch": 3, "log_every": 1,
              "samples": 4, "seed": 0},
}

# Checkpointed every 2 steps, 9 steps in all (2 epochs by parts, 1 fine-tuning, 3 steps each), no samples.
CHECKPOINTED = {"train.by_parts_epochs": 2, "train.lr": 2e-3, "train.samples": 0, "train.threads": 1,
                "train.eval_ema": 0.9, "distributed.timeout_s": 30, "checkpoint.every_steps": 2, "checkpoint.keep": 3}

# The above for torchrun: 15 steps of 32 images, every step checkpointed, and enough kept for the
# pipeline's skew between its stages (see multirank.check_keep).
CHECKPOINTED_MULTIRANK = {**CHECKPOINTED, "train.batch_size": 32, "train.steps_per_epoch": 5,
                          "checkpoint.every_steps": 1, "checkpoint.keep": 8}

# Multi-rank runs compared with one device: 2 epochs by parts of 5 steps of 32 images, one test batch of 96.
MULTIRANK = {"data.test_limit": 96, "train.by_parts_epochs": 2, "train.finetune_epochs": 0, "train.batch_size": 32,
             "train.eval_batch_size": 256, "train.lr": 2e-3, "train.warmup_steps": 4, "train.steps_per_epoch": 5,
             "train.threads": 1, "distributed.timeout_s": 60}


def tiny(*overrides: dict) -> dict[str, dict]:
    """:data:`TINY` with ``{"section.key": value}`` overrides applied in order (later ones win)."""
    config = {section: dict(keys) for section, keys in TINY.items()}
    for changes in overrides:
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            config.setdefault(section, {})[key] = value
    return config


def toml(config: dict[str, dict]) -> str:
    """The TOML text of a config dict (JSON's spelling of strings, numbers, booleans and lists is TOML's)."""
    return "\n".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
                     for section, keys in config.items())


def write_config(folder: Path, *overrides: dict, name: str = "tiny.toml") -> Path:
    """Write ``tiny(*overrides)`` to ``folder/name`` and return its path."""
    path = folder / name
    path.write_text(toml(tiny(*overrides)))
    return path


# --- running pipeflow as a user does -----------------------------------------------------------------


def pipeflow(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``pipeflow ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "pipeflow.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def pipeflow_in_process(*args):
    """``pipeflow ARGS`` through typer's test runner: the same command, without an interpreter's start-up.
    Returns click's ``Result`` (``exit_code``, ``stdout``, ``stderr``, ``exception``)."""
    from typer.testing import CliRunner

    from pipeflow.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], prog_name="pipeflow")


def in_process(*args) -> None:
    """``pipeflow ARGS`` in this process, which must succeed: the one-device runs the multi-rank tests hold
    their ranks to, without the start-up (imports) of another interpreter."""
    result = pipeflow_in_process(*args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)


def torchrun(nproc: int, config: Path, out: Path, *extra, env: dict | None = None, restarts: int = 0,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC -m pipeflow.launch --config CONFIG --out OUT EXTRA``; with
    PIPEFLOW_TEST_FAULT in ``env``, ``-m tests.faults`` instead: the same launch, with those faults injected."""
    module = "tests.faults" if "PIPEFLOW_TEST_FAULT" in (env or {}) else "pipeflow.launch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", "-m", module, "--config", str(config), "--out", str(out),
           *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)


def ranks_of_script(source: str, folder: Path, nproc: int = 2) -> list[dict]:
    """Run the Python ``source`` under torchrun on ``nproc`` processes; what each rank wrote.

    The script gets a path prefix as its argument and writes its rank's JSON to prefix + rank.
    """
    script = folder / "script.py"
    script.write_text(source)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           str(folder / "out")]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV))
    return [json.loads((folder / f"out{rank}").read_text()) for rank in range(nproc)]


def launch_lines(stderr: str, kind: str = "") -> list[str]:
    """The lines ``pipeflow.launch`` itself wrote (``pipeflow.launch: KIND ...``), not torchrun's."""
    return [line for line in stderr.splitlines() if line.startswith(f"pipeflow.launch: {kind}")]


# --- what the tests check ----------------------------------------------------------------------------


def ok(result: subprocess.CompletedProcess) -> None:
    """The command succeeded (else show the end of what it printed)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def refused(code: int, stdout: str, stderr: str, message: str) -> None:
    """Bad input: exit status 2, no traceback, and exactly one line on stderr: ``pipeflow: error: MESSAGE``."""
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [f"pipeflow: error: {message}"], stderr


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under ``path``, with a hash of each file's bytes: equal snapshots mean nothing
    was written, replaced, created or deleted there."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def model_state(run: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers a run directory's ``model.pt`` holds."""
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def max_difference(a: Path, b: Path) -> float:
    """The largest difference between two runs' parameters (0.0: bit for bit the same)."""
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def metrics(run: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable_metrics(run: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` without their clock readings, which no two runs share."""
    timing = {"wall", "images_per_s", "train_seconds", "busy_fraction", "seconds", "busy_seconds"}
    return [{k: v for k, v in record.items() if k not in timing} for record in metrics(run)]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_replicas_equal(run: Path, stages: int = 2) -> dict:
    """The newest checkpoints of the two replicas of each stage hold the same tensors, to the bit; rank 0's."""
    def last_part(rank: int) -> dict:
        newest = sorted((run / "checkpoints" / f"rank{rank}").glob("step-*.pt"))[-1]
        return torch.load(newest, weights_only=False)["modules"][0]

    for stage in range(stages):  # rank r is stage r % P of replica r // P
        first, second = last_part(stage), last_part(stage + stages)
        assert first.keys() == second.keys()
        assert [k for k in first if not torch.equal(first[k], second[k])] == [], stage
    return last_part(0)


# --- faults on one device --------------------------------------------------------------------------


class Crash(Exception):
    """Stands for a process killed after a given step."""


def crash_after(step: int):
    """A hook for ``train(..., after_step=...)`` that kills the run after ``step``."""

    def hook(s: int) -> None:
        if s == step:
            raise Crash(step)

    return hook
