"""``make gpu-check``'s script: one line without CUDA, and its whole logic on a tiny CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def gpu_check(*args, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeflow.tools.gpu_check", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    done = gpu_check("--out", tmp_path, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu-check: needs a CUDA device and torch sees none (torch.cuda.is_available() is False)"]
    assert not list(tmp_path.iterdir())


def test_a_tiny_cpu_dry_run_records_the_ratio_and_the_memory(tmp_path):
    done = gpu_check("--device", "cpu", "--tiny", "--steps", "3", "--warmup", "2", "--out", tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [path] = tmp_path.glob("gpu_check_*.json")
    result = json.loads(path.read_text())
    check = result["check"]
    assert check["gpus"] == 0 and not check["errors"]
    assert "e2e" in check["peak_memory_bytes"] and any(n.startswith("alternate") for n in check["peak_memory_bytes"])
    ratio = check["alternate_over_e2e"]
    assert ratio["paper"] == 720 / 1026
    assert 0 < ratio["flop_model"] < 1  # one part trains per step: less work than end to end
    assert ratio["measured"] == result["bench"]["predictions"]["alternate"]["step_ratio"]["measured"]
    util, ceiling = check["utilisation_and_ceiling"]["e2e"]
    assert 0 < util and 0 < ceiling and check["utilisation_and_ceiling"][next(
        n for n in check["peak_memory_bytes"] if n.startswith("alternate"))][1] is None  # alternate: no one step
    assert torch.__version__ == result["torch"]
