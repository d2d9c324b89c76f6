"""The command line, run as a user runs it (a subprocess): train -> eval -> sample, plan, --force.
(Bad input: test_config.py for config values, test_bad_input.py for the rest.)"""

from __future__ import annotations

import json
import re

import pytest

from support import ok, pipeflow, pipeflow_in_process, refused, summary, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through the CLI, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("cli")
    config = write_config(tmp)
    out = tmp / "run"
    result = pipeflow("train", "--config", config, "--out", out, "--set", "train.seed=3")
    ok(result)
    return config, out, result


def test_train_writes_a_run(trained):
    config, out, result = trained
    assert "Traceback" not in result.stderr
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.pt"):
        assert (out / name).is_file()
    assert "train.seed" not in (out / "config.toml").read_text()  # the resolved config, not the overrides
    assert "seed = 3" in (out / "config.toml").read_text()
    assert f"{summary(out)['test_bpd']:.4f}" in result.stdout  # the closing table shows the final bits/dim


def test_eval_reproduces_the_runs_test_bpd(trained, tmp_path):
    _, out, _ = trained
    test_bpd = summary(out)["test_bpd"]
    result = pipeflow("eval", "--checkpoint", out / "model.pt", "--json", tmp_path / "eval.json")
    ok(result)
    printed = float(re.search(r"test bits/dim: ([0-9.]+)", result.stdout).group(1))
    assert abs(printed - test_bpd) <= 0.5e-4 + 1e-9  # printed to 4 decimals
    exact = json.loads((tmp_path / "eval.json").read_text())["test_bpd"]
    assert abs(exact - test_bpd) < 1e-5


def test_sample_writes_a_png(trained, tmp_path):
    _, out, _ = trained
    png = tmp_path / "grid" / "s.png"
    result = pipeflow("sample", "--checkpoint", out / "model.pt", "--out", png, "--n", 9, "--temperature", 0.5)
    ok(result)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 9 samples" in result.stdout

    from PIL import Image

    assert Image.open(png).size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)  # a 3x3 grid of 8x8 digits, 2-pixel padding
    again, other_seed, other_t = tmp_path / "again.png", tmp_path / "seed.png", tmp_path / "t.png"
    for path, extra in ((again, []), (other_seed, ["--seed", 1]), (other_t, ["--temperature", 0.9])):
        # the same command in this process (no interpreter to start): the draws it makes are the command's
        result = pipeflow_in_process("sample", "--checkpoint", out / "model.pt", "--out", path, "--n", 9, *extra,
                                     *([] if "--temperature" in extra else ["--temperature", 0.5]))
        assert result.exit_code == 0, result.stdout
    assert again.read_bytes() == png.read_bytes()  # --seed 0 is the default: the same draw
    assert other_seed.read_bytes() != png.read_bytes()
    assert other_t.read_bytes() != png.read_bytes()


def test_plan_prints_a_table(tiny_config_path, tmp_path):
    # the paper's N(0, I) at the boundary: one part trains per step, less work than end to end (a `flow`
    # head larger than the tiny model's part would cost more)
    result = pipeflow("plan", "--config", tiny_config_path, "--set", "parts.boundary_prior=standard",
                      "--json", tmp_path / "plan.json")
    ok(result)
    assert "across (configured): 2 parts" in result.stdout
    assert "alternate step / e2e step" in result.stdout and "GFLOP/img" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {"across", "blocks", "balanced"} <= plan.keys()
    across = plan["across"]
    assert [p["steps"] for p in across["parts"]] == [[1, 1], [2, 4]]
    assert sum(p["share"] for p in across["parts"]) == pytest.approx(1.0)
    assert 0 < across["alternate_step"] < 1


def test_force_replaces_a_run(trained, tmp_path):
    config, out, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "summary.json").write_text("{}")
    (copy / "unrelated.txt").write_text("keep me")
    result = pipeflow_in_process("train", "--config", config, "--out", copy, "--force", "--quiet",
                                 "--set", "train.by_parts_epochs=0", "--set", "train.finetune_epochs=0")
    assert result.exit_code == 0, result.stderr
    assert "test_bpd" in summary(copy)
    assert (copy / "unrelated.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (("bench", "--parts", "1"), "Invalid value for '--parts' / '-p': Input should be greater than or equal to 2 "
                                "(see 'pipeflow bench --help')"),
    (("train", "--outt"), "No such option: --outt (Possible options: --out, --quiet) (see 'pipeflow train --help')"),
    (("eval",), "Missing option '--checkpoint'. (see 'pipeflow eval --help')"),
    (("nosuch",), "No such command 'nosuch'. (see 'pipeflow --help')"),
])
def test_what_typer_refuses_is_one_line_too(args, message):
    """Options typer checks itself (names, minimums, required ones) fail as pipeflow's own checks do."""
    result = pipeflow_in_process(*args)
    refused(result.exit_code, result.stdout, result.stderr, message)


def test_help_and_success_keep_status_0():
    assert pipeflow_in_process("bench", "--help").exit_code == 0
    assert pipeflow_in_process("--help").exit_code == 0


def test_an_overflowed_sample_is_drawn_saturated_not_cast_to_garbage():
    """An early model's inverse can overflow to inf and nan; the grid must still be valid pixels."""
    import torch

    from pipeflow.runlog import pixels

    images = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.25, -2.0]).view(5, 1, 1, 1)
    assert pixels(images).flatten().tolist() == [0.5, 1.0, 0.0, 0.75, 0.0]
