"""The command line, run as a user runs it (a subprocess): train -> eval -> sample, plan, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", "PYTHONPATH": str(ROOT)}


def pipeflow(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeflow.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through the CLI, shared by the tests of this module."""
    from conftest import TINY_TOML

    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp / "run"
    result = pipeflow("train", "--config", config, "--out", out, "--set", "train.seed=3")
    assert result.returncode == 0, result.stderr
    return config, out, result


def test_train_writes_a_run(trained):
    config, out, result = trained
    assert "Traceback" not in result.stderr
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.pt"):
        assert (out / name).is_file()
    assert "train.seed" not in (out / "config.toml").read_text()  # the resolved config, not the overrides
    assert "seed = 3" in (out / "config.toml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['test_bpd']:.4f}" in result.stdout  # the closing table shows the final bits/dim


def test_eval_reproduces_the_runs_test_bpd(trained, tmp_path):
    _, out, _ = trained
    summary = json.loads((out / "summary.json").read_text())
    result = pipeflow("eval", "--checkpoint", out / "model.pt", "--json", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr
    printed = float(re.search(r"test bits/dim: ([0-9.]+)", result.stdout).group(1))
    assert abs(printed - summary["test_bpd"]) <= 0.5e-4 + 1e-9  # printed to 4 decimals
    exact = json.loads((tmp_path / "eval.json").read_text())["test_bpd"]
    assert abs(exact - summary["test_bpd"]) < 1e-5


def test_sample_writes_a_png(trained, tmp_path):
    _, out, _ = trained
    png = tmp_path / "grid" / "s.png"
    result = pipeflow("sample", "--checkpoint", out / "model.pt", "--out", png, "--n", 9, "--temperature", 0.5)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 9 samples" in result.stdout

    from PIL import Image

    assert Image.open(png).size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # a 3x3 grid of 8x8 digits, 2-pixel padding
    again, other_seed, other_t = tmp_path / "again.png", tmp_path / "seed.png", tmp_path / "t.png"
    for path, extra in ((again, []), (other_seed, ["--seed", 1]), (other_t, ["--temperature", 0.9])):
        result = pipeflow("sample", "--checkpoint", out / "model.pt", "--out", path, "--n", 9, *extra,
                          *([] if "--temperature" in extra else ["--temperature", 0.5]))
        assert result.returncode == 0, result.stderr
    assert again.read_bytes() == png.read_bytes()  # --seed 0 is the default: the same draw
    assert other_seed.read_bytes() != png.read_bytes()
    assert other_t.read_bytes() != png.read_bytes()


def test_plan_prints_a_table(tiny_config_path, tmp_path):
    result = pipeflow("plan", "--config", tiny_config_path, "--json", tmp_path / "plan.json")
    assert result.returncode == 0, result.stderr
    assert "across (configured): 2 parts" in result.stdout
    assert "alternate step / e2e step" in result.stdout and "GFLOP/img" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {"across", "blocks", "balanced"} <= plan.keys()
    across = plan["across"]
    assert [p["steps"] for p in across["parts"]] == [[1, 1], [2, 4]]
    assert sum(p["share"] for p in across["parts"]) == pytest.approx(1.0)
    assert 0 < across["alternate_step"] < 1


def _bad_inputs(trained_out: Path, tmp: Path, config: Path):
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((trained_out / "model.pt").read_bytes()[:2000])
    return {
        "missing config": ("train", "--config", tmp / "nope.toml", "--out", tmp / "r1"),
        "unknown key": ("train", "--config", config, "--set", "train.speed=3", "--out", tmp / "r2"),
        "bad value": ("train", "--config", config, "--set", "model.levels=0", "--out", tmp / "r3"),
        "ill-typed value": ("plan", "--config", config, "--set", "train.lr=fast"),
        "levels too deep": ("plan", "--config", config, "--set", "model.levels=4"),
        "missing npz": ("train", "--config", config, "--set", "data.dataset=npz",
                        "--set", f"data.path={tmp / 'none.npz'}", "--out", tmp / "r4", "--quiet"),
        "corrupt checkpoint": ("eval", "--checkpoint", garbage),
        "truncated checkpoint": ("sample", "--checkpoint", truncated, "--out", tmp / "s.png"),
        "missing checkpoint": ("eval", "--checkpoint", tmp / "none.pt"),
        "run already there": ("train", "--config", config, "--out", trained_out),
    }


BAD = ["missing config", "unknown key", "bad value", "ill-typed value", "levels too deep", "missing npz",
       "corrupt checkpoint", "truncated checkpoint", "missing checkpoint", "run already there"]
# each case also runs in-process below; these few also go through a real interpreter, end to end
BAD_IN_SUBPROCESS = ["missing config", "corrupt checkpoint", "run already there"]


def _check_one_line_error(code, stdout, stderr):
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize("case", BAD_IN_SUBPROCESS)
def test_bad_input_in_a_subprocess(trained, tmp_path, case):
    config, out, _ = trained
    before = (out / "summary.json").read_bytes()
    result = pipeflow(*_bad_inputs(out, tmp_path, config)[case])
    _check_one_line_error(result.returncode, result.stdout, result.stderr)
    assert (out / "summary.json").read_bytes() == before  # the existing run is left alone


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_status_2(trained, tmp_path, case):
    from typer.testing import CliRunner

    from pipeflow.cli import app

    config, out, _ = trained
    before = (out / "summary.json").read_bytes()
    result = CliRunner().invoke(app, [str(a) for a in _bad_inputs(out, tmp_path, config)[case]])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check_one_line_error(result.exit_code, result.stdout, result.stderr)
    assert (out / "summary.json").read_bytes() == before


def test_force_replaces_a_run(trained, tmp_path):
    config, out, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "summary.json").write_text("{}")
    (copy / "unrelated.txt").write_text("keep me")
    from typer.testing import CliRunner

    from pipeflow.cli import app

    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(copy), "--force", "--quiet",
                                      "--set", "train.by_parts_epochs=0", "--set", "train.finetune_epochs=0"])
    assert result.exit_code == 0, result.stderr
    assert "test_bpd" in json.loads((copy / "summary.json").read_text())
    assert (copy / "unrelated.txt").read_text() == "keep me"
