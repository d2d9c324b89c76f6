"""What a new user meets first: the design card's command with no config, the defaults it runs on,
output that reads whole in a file, and TensorBoard's view of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeflow.config import Config, load_config, to_toml, with_overrides
from pipeflow.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# A tiny budget for the default model: one short epoch of each phase, a few test images.
BUDGET = ["--set", "train.by_parts_epochs=1", "--set", "train.finetune_epochs=1", "--set", "train.steps_per_epoch=2",
          "--set", "data.test_limit=48", "--set", "train.samples=4"]


def test_the_design_card_command_trains_one_part_per_process(tmp_path):
    """`torchrun --nproc_per_node=3 -m pipeflow.launch`, no config, no --out: 3 parts, a run in runs/launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "-m", "pipeflow.launch", *BUDGET]
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "launch"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parts"] == 3 and summary["world_size"] == 3
    assert (run / "model.pt").is_file()
    assert load_config(run / "config.toml").parts.count == 3  # the run's config holds the count it used


def test_parts_count_left_out_follows_the_processes():
    assert load_config().parts.count == 2  # one device
    assert load_config(processes=3).parts.count == 3
    assert load_config(overrides=["parts.count=0"], processes=4).parts.count == 4  # 0: left out
    assert load_config(overrides=["train.schedule=e2e"], processes=4).parts.count == 2  # e2e trains no parts
    assert load_config(overrides=["parts.count=2"], processes=4).parts.count == 2  # asked for: 2 replicas


def test_a_resumed_run_left_without_count_is_the_same_run(tmp_path):
    """config.toml holds the resolved count: the same command, resumed, compares equal to it."""
    from pipeflow.checkpoint import config_difference

    first = load_config(processes=3)
    (tmp_path / "config.toml").write_text(to_toml(first))
    saved = load_config(tmp_path / "config.toml")
    assert saved == first and "count = 3" in to_toml(first)
    assert config_difference(saved.to_dict(), load_config(processes=3)) is None
    assert "parts.count = 3 there, 2 here" in config_difference(saved.to_dict(), load_config(processes=2))


def test_an_explicit_count_that_does_not_fit_the_processes_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "pipeflow.launch", "--set", "parts.count=2", "--out", str(tmp_path / "x")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("pipeflow.launch: error (rank 0): 1 processes cannot run 2 parts: the number of "
                                     "processes must be a multiple of parts.count (torchrun --nproc_per_node=2, or "
                                     "2 x replicas)")


def test_the_defaults_are_a_model_for_the_digits_not_the_papers():
    from pipeflow.build import build_model
    from pipeflow.data import dataset_shape

    cfg = load_config()
    assert cfg.data.dataset == "digits"
    params = sum(p.numel() for p in build_model(cfg, dataset_shape(cfg.data)).parameters())
    paper = with_overrides(Config(), ["model.steps=32", "model.hidden=512"])
    assert params < sum(p.numel() for p in build_model(paper, (1, 8, 8)).parameters()) / 50
    assert cfg.train.batch_size % 3 == 0  # 3 processes share each fine-tuning batch evenly
    with pytest.raises(UserError, match="parts.count = -1 must be at least 0"):
        load_config(overrides=["parts.count=-1"])


def test_plan_in_a_file_shows_every_figure_whole(tmp_path):
    """Not a terminal: no table is cut to 80 columns (the parameter counts were printed as '9,340,6…')."""
    env = {**ENV, "COLUMNS": "80"}  # the plan's tables are wider
    cmd = [sys.executable, "-m", "pipeflow.cli", "plan", "--json", str(tmp_path / "plan.json")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    for scheme in json.loads((tmp_path / "plan.json").read_text()).values():
        for part in scheme["parts"]:
            assert f"{part['params']:,}" in result.stdout


def test_training_output_in_a_file_is_plain_lines(tiny_config_path, tmp_path):
    """No live bar, no rich source-path column ('progress.py:41'), no line padded to the console's width."""
    cmd = [sys.executable, "-m", "pipeflow.cli", "train", "--config", str(tiny_config_path), "--out",
           str(tmp_path / "r")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(" ", 1)[1].split(":")[0] for line in lines] == ["by_parts epoch 1", "finetune epoch 2"]
    assert all(".py:" not in line and line == line.rstrip() and "━" not in line for line in lines)


def test_make_console_is_unbounded_and_unwrapped_off_a_terminal():
    from rich.table import Table

    from pipeflow.progress import make_console

    console = make_console()
    assert not console.is_terminal  # pytest captures stdout
    table = Table()
    for k in range(12):
        table.add_column(f"column {k}")
    table.add_row(*[f"{10**12 + k:,}" for k in range(12)])
    with console.capture() as captured:
        console.print(table)
    assert all(f"{10**12 + k:,}" in captured.get() for k in range(12))


def test_tensorboard_holds_the_runs_scalars_and_sample_grids(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeflow.train import train

    cfg = with_overrides(tiny_config, ["train.schedule=pipeline"])
    train(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["kind"] == "step" and r["phase"] == "by_parts" and r["part"] == 1)
    loss = {e.step: e.value for e in events.Scalars("loss/by_parts/part1")}
    assert loss[step["step"]] == pytest.approx(step["loss"], rel=1e-6)
    assert {"prefix_bpd/by_parts/part0", "lr/by_parts/part0", "images_per_s/by_parts/part0", "test_bpd/finetune",
            "test_prefix_bpd/by_parts/part1"} <= set(events.Tags()["scalars"])
    final = [e.value for e in events.Scalars("test_bpd/finetune")][-1]
    assert final == pytest.approx(json.loads((tmp_path / "run" / "summary.json").read_text())["test_bpd"], rel=1e-6)
    assert set(events.Tags()["images"]) == {"samples/by_parts", "samples/finetune"}


def test_a_resumed_run_hides_what_tensorboard_got_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeflow.runlog import RunLog

    first = RunLog(tmp_path, load_config())
    for step in (1, 2):
        first.log({"kind": "step", "phase": "by_parts", "part": 0, "step": step, "loss": float(step)})
    kept = first.tell()
    first.log({"kind": "step", "phase": "by_parts", "part": 0, "step": 3, "loss": 99.0})  # after the checkpoint
    first.close()
    resumed = RunLog(tmp_path, load_config(), metrics_bytes=kept)
    resumed.log({"kind": "step", "phase": "by_parts", "part": 0, "step": 3, "loss": 3.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/by_parts/part0")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
