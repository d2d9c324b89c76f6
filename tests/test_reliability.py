"""Faults and bad input: checkpoints, resuming, restarts under torchrun, silent peers, non-finite
steps, singular layers, and every bad input ending in one line and status 2 with nothing overwritten.

The multi-rank tests run tiny models on CPU with gloo; faults are injected with the test-only
PIPEFLOW_TEST_FAULT variable that ``pipeflow.launch`` reads (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeflow.checkpoint import CheckpointStore, atomic_write_json, config_difference
from pipeflow.config import load_config, with_overrides
from pipeflow.data import Batches
from pipeflow.distributed.topology import Topology
from pipeflow.errors import UserError
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.multirank import check_keep, plan_resume
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, check_invertible
from pipeflow.parts import whole_model_part
from pipeflow.build import build_run
from pipeflow.train import train

ROOT = Path(__file__).resolve().parents[1]

# --- helpers -------------------------------------------------------------------------------------

TINY = """
[model]
levels = 2
steps = 2
hidden = 8
[data]
test_limit = 64
[parts]
count = 2
scheme = "across"
[train]
schedule = "pipeline"
by_parts_epochs = 2
finetune_epochs = 1
batch_size = 16
eval_batch_size = 64
lr = 2e-3
warmup_steps = 2
steps_per_epoch = 3
samples = 0
threads = 1
log_every = 1
[distributed]
timeout_s = 30
[checkpoint]
every_steps = 2
keep = 3
"""

# for torchrun: every step checkpointed, keep enough for the pipeline's skew (see check_keep)
TINY_MULTI = TINY.replace("every_steps = 2\nkeep = 3", "every_steps = 1\nkeep = 8").replace(
    "batch_size = 16", "batch_size = 32").replace("steps_per_epoch = 3", "steps_per_epoch = 5")


def write(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def states_equal(a: Path, b: Path) -> float:
    sa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def comparable_metrics(run: Path) -> list[dict]:
    timing = {"wall", "images_per_s", "train_seconds", "busy_fraction", "seconds", "busy_seconds"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` and a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeflow.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def torchrun(nproc: int, config: Path, out: Path, *extra: str, env: dict | None = None, restarts: int = 0,
             timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", "-m", "pipeflow.launch", "--config", str(config), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=ROOT)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def launch_lines(stderr: str, kind: str = "") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"pipeflow.launch: {kind}")]


class Crash(Exception):
    """Stands for a process killed after a given step."""


def crash_after(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise Crash(step)

    return hook


# --- data and checkpoint files -------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epoch_resumed_mid_way_yields_exactly_the_remaining_batches(shuffle):
    images = torch.randint(0, 17, (50, 1, 8, 8), dtype=torch.uint8)
    batches = Batches(images, 17, 0, 8, seed=3, shuffle=shuffle, drop_last=shuffle)
    full = list(batches.epoch(2))
    for start in range(len(batches) + 1):
        rest = list(batches.epoch(2, start=start))
        assert len(rest) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(full[start:], rest))


def test_run_files_stay_strict_json_when_a_figure_is_not_finite(tmp_path):
    atomic_write_json(tmp_path / "summary.json", {"test_bpd": math.inf, "history": [{"loss": math.nan}, 1.5]})
    text = (tmp_path / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"test_bpd": None, "history": [{"loss": None}, 1.5]}


def test_checkpoint_store_is_atomic_listed_and_pruned(tmp_path):
    store = CheckpointStore(tmp_path, rank=1, keep=2)
    for step in (2, 4, 6, 8):
        store.save(step, "by_parts", {"x": torch.full((3,), float(step))}, world=2, stages=2)
    files = sorted(p.name for p in store.dir.iterdir())
    assert files == ["manifest.json", "step-000000006.pt", "step-000000008.pt"]
    assert [e["step"] for e in store.entries()] == [6, 8]
    assert torch.equal(store.load(8)["x"], torch.full((3,), 8.0))
    # a torn write of a killed attempt is never listed, and goes when a resumed attempt starts
    (store.dir / ".step-000000010.pt.abc.tmp").write_bytes(b"half a file")
    store.discard_after(6)
    assert sorted(p.name for p in store.dir.iterdir()) == ["manifest.json", "step-000000006.pt"]
    # a corrupt file or manifest is bad input, in one line
    (store.dir / "step-000000006.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is corrupt or not a pipeflow file"):
        store.load(6)
    store.manifest_path.write_text("{")
    with pytest.raises(UserError, match="manifest .* is corrupt"):
        store.entries()


def test_config_difference_names_the_first_key_that_makes_another_run(tiny_config):
    saved = tiny_config.to_dict()
    assert config_difference(saved, tiny_config) is None
    # learning rates, threads, timeouts, checkpointing may change between attempts
    changed = with_overrides(tiny_config, ["train.lr=1e-5", "train.threads=2", "distributed.timeout_s=9",
                                           "checkpoint.keep=5"])
    assert config_difference(saved, changed) is None
    assert config_difference(saved, with_overrides(tiny_config, ["model.hidden=16"])) == \
        "model.hidden = 8 there, 16 here"
    assert config_difference(saved, with_overrides(tiny_config, ["train.seed=3"])) == "train.seed = 0 there, 3 here"


def test_keep_must_cover_the_pipeline_skew(tiny_config):
    cfg = with_overrides(tiny_config, ["checkpoint.every_steps=1", "checkpoint.keep=2", "train.by_parts_epochs=2"])
    with pytest.raises(UserError) as info:
        check_keep(cfg, Topology(0, 2, 2), steps_per_epoch=10)
    assert str(info.value) == (
        "checkpoint.keep = 2 is too few for 2 pipeline stages: stage 0 may have saved 5 steps more than stage 1 "
        "(distributed.in_flight = 2), and 5 checkpoints (every 1 steps and at each epoch's end) can fall in that "
        "span, so the newest step that every rank has saved could be deleted; set checkpoint.keep = 6 or more, "
        "or raise checkpoint.every_steps")
    check_keep(with_overrides(cfg, ["checkpoint.keep=6"]), Topology(0, 2, 2), steps_per_epoch=10)
    # the defaults (epoch ends only, keep 2) suit any epoch longer than the skew
    check_keep(with_overrides(tiny_config, ["train.by_parts_epochs=5"]), Topology(0, 3, 3), steps_per_epoch=11)
    check_keep(cfg, Topology(0, 1, 1), steps_per_epoch=10)  # one stage: no skew


def test_resume_plan_is_the_newest_step_every_rank_has():
    topo = Topology(0, 3, 3)

    def entries(steps, phase="by_parts", world=3, stages=3):
        return [{"step": s, "phase": phase, "entry": "launch", "world": world, "stages": stages} for s in steps]

    assert plan_resume([entries([8, 10, 12]), entries([6, 8, 10]), entries([4, 6, 8])], topo) == ("by_parts", 8)
    finetuned = [entries([12]) + entries([14], "finetune"), entries([12]), entries([12])]
    assert plan_resume(finetuned, topo) == ("finetune", 14)
    assert plan_resume([entries([2]), entries([]), entries([])], topo) is None  # a rank saved nothing yet
    with pytest.raises(UserError, match=r"no step is saved by every rank \(rank 0: 10, 12; rank 1: 6, 8"):
        plan_resume([entries([10, 12]), entries([6, 8]), entries([4, 6])], topo)
    with pytest.raises(UserError, match="written by 2 processes running 2 parts, not 3 running 3"):
        plan_resume([entries([2], world=2, stages=2)] * 3, topo)
    with pytest.raises(UserError, match="written by `pipeflow train` on one device"):
        plan_resume([[{"step": 2, "phase": "by_parts", "entry": "train", "world": 1}], [], []], topo)


# --- numerical guards ----------------------------------------------------------------------------


def _trainer(tiny_config, lu=True, max_bad_steps=3):
    cfg = with_overrides(tiny_config, ["train.schedule=e2e", f"model.lu={'true' if lu else 'false'}",
                                       f"train.max_bad_steps={max_bad_steps}"])
    run = build_run(cfg)
    x = next(run.train_batches().epoch(0))
    run.model.initialize(x)
    trainer = PartTrainer(whole_model_part(run.model), 1e-3, cfg.train, run.num_dims, run.n_bins, name="whole model")
    return run, trainer, x


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_max_bad_steps(tiny_config):
    run, trainer, x = _trainer(tiny_config, max_bad_steps=3)
    trainer.train_step(x, torch.zeros(len(x)))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    optimizer_before = trainer.state_dict()["optimizer"]["state"][0]["exp_avg"].clone()
    bad = x * float("nan")
    for _ in range(2):
        _, loss = trainer.train_step(bad, torch.zeros(len(x)))
        assert math.isnan(loss)
    assert (trainer.skipped, trainer.bad_in_a_row, trainer.steps) == (2, 2, 1)
    # a skipped step changes nothing: parameters, optimiser state, warm-up progress
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(trainer.state_dict()["optimizer"]["state"][0]["exp_avg"], optimizer_before)
    trainer.train_step(x, torch.zeros(len(x)))  # a good step resets the run of bad ones
    assert (trainer.skipped, trainer.bad_in_a_row) == (2, 0)
    for _ in range(2):
        trainer.train_step(bad, torch.zeros(len(x)))
    with pytest.raises(TrainingDiverged, match=r"^whole model: 3 non-finite losses in a row \(train.max_bad_steps\)"):
        trainer.train_step(bad, torch.zeros(len(x)))


@pytest.mark.parametrize("lu", [False, True])
def test_a_singular_layer_is_an_error_naming_it_not_a_silent_nan(tiny_config, lu):
    run, trainer, x = _trainer(tiny_config, lu=lu, max_bad_steps=10)
    conv = run.model.layers[5].invconv
    with torch.no_grad():
        if lu:
            conv.log_s[0] = -math.inf
        else:
            conv.weight.zero_()
    with pytest.raises(SingularWeightError, match=r"^whole model: 1x1 convolution layers\.5\.invconv has a singular"):
        trainer.train_step(x, torch.zeros(len(x)))


def test_a_broken_actnorm_is_named_too(tiny_config):
    run, trainer, x = _trainer(tiny_config)
    with torch.no_grad():
        run.model.layers[1].actnorm.log_scale[0, 0] = math.inf
    with pytest.raises(SingularWeightError, match=r"ActNorm layers\.1\.actnorm has a non-finite scale"):
        trainer.train_step(x, torch.zeros(len(x)))


def test_a_singular_layer_in_a_part_is_named_as_in_the_whole_model(tiny_config):
    run = build_run(with_overrides(tiny_config, ["parts.scheme=cuts", "parts.cuts=[2]"]))
    second = run.parts[1]
    conv = run.model.layers[5].invconv
    assert any(m is conv for m in second.modules())  # flow step 3 sits in part 1, at another index there
    with torch.no_grad():
        conv.log_s[0] = -math.inf
    with pytest.raises(SingularWeightError, match=r"^part 1: 1x1 convolution layers\.5\.invconv has a singular"):
        check_invertible(second, "part 1")


# --- one device: checkpoints and resuming --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    return load_config(write(tmp_path_factory.mktemp("cfg")))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_cfg, out)
    return out


@pytest.mark.parametrize("crash_at", [2, 3, 5, 8])  # mid-epoch checkpoint, epoch end, by parts, fine-tuning
def test_one_device_resumes_to_the_uninterrupted_parameters(tmp_path, tiny_cfg, reference_run, crash_at):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_cfg, out, after_step=crash_after(crash_at))
    assert not (out / "summary.json").exists()
    summary = train(tiny_cfg, out, resume=True)
    assert summary["resumed_from_step"] == {2: 2, 3: 3, 5: 4, 8: 8}[crash_at]  # epoch ends checkpoint too
    assert states_equal(out, reference_run) == 0.0
    assert comparable_metrics(out) == comparable_metrics(reference_run)
    reference = json.loads((reference_run / "summary.json").read_text())
    assert summary["test_bpd"] == reference["test_bpd"] and summary["steps"] == reference["steps"]
    # resuming a finished run changes nothing
    before = snapshot(out)
    assert train(tiny_cfg, out, resume=True)["test_bpd"] == summary["test_bpd"]
    assert snapshot(out) == before


def test_checkpoints_are_kept_per_rank_with_a_manifest(reference_run, tiny_cfg):
    folder = reference_run / "checkpoints" / "rank0"
    manifest = json.loads((folder / "manifest.json").read_text())
    steps = [e["step"] for e in manifest["checkpoints"]]
    # every 2 steps and after every epoch (3 steps each, 9 in all); the newest 3 kept
    assert steps == [6, 8, 9]
    assert sorted(p.name for p in folder.glob("*.pt")) == [e["file"] for e in manifest["checkpoints"]]
    blob = torch.load(folder / "step-000000008.pt", weights_only=True)
    assert blob["step"] == 8 and blob["phase"] == "finetune" and blob["config"] == tiny_cfg.to_dict()
    assert blob["run"]["step"] == 8 and blob["run"]["phase"] == "finetune" and blob["entry"] == "train"
    assert {"modules", "trainers", "run", "rng", "metrics_bytes"} <= blob.keys()


def test_divergence_stops_with_the_last_good_checkpoint_and_resumes_from_it(tmp_path, tiny_cfg, reference_run,
                                                                          monkeypatch):
    import pipeflow.data as data

    cfg = with_overrides(tiny_cfg, ["train.max_bad_steps=2"])
    real = data.dequantize
    poisoned = {"on": False}

    def dequantize(*args, **kwargs):
        x = real(*args, **kwargs)
        return x * float("nan") if poisoned["on"] else x

    def poison_after(step):
        poisoned["on"] = step >= 4  # the batches of steps 5 and 6 (epoch 2's last two) are NaN

    monkeypatch.setattr(data, "dequantize", dequantize)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, out, after_step=poison_after)
    assert str(info.value).startswith("part 0: 2 non-finite losses in a row (train.max_bad_steps); lower train.lr")
    assert f"the newest checkpoint in {out / 'checkpoints' / 'rank0'}, of step 4, holds the parameters of step 4" \
        in str(info.value)
    poisoned["on"] = False
    monkeypatch.setattr(data, "dequantize", real)
    summary = train(cfg, out, resume=True)
    assert summary["resumed_from_step"] == 4 and summary["skipped_steps"] == 0
    assert states_equal(out, reference_run) == 0.0  # the skipped steps changed nothing


def test_a_skipped_step_is_counted_in_the_summary(tmp_path, tiny_cfg, monkeypatch):
    import pipeflow.data as data

    real = data.dequantize
    calls = {"n": 0}

    def dequantize(*args, **kwargs):  # the 3rd batch drawn is step 2's (after the init batch and step 1's)
        calls["n"] += 1
        x = real(*args, **kwargs)
        return x * float("nan") if calls["n"] == 3 else x

    monkeypatch.setattr(data, "dequantize", dequantize)
    summary = train(tiny_cfg, tmp_path / "run")
    assert summary["skipped_steps"] == 2  # part 0 on the NaN batch, and part 1 on part 0's NaN output
    assert math.isfinite(summary["test_bpd"])


# --- bad input: one line, status 2, no traceback, nothing overwritten ---------------------------


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Crash):
        train(tiny_cfg, out, after_step=crash_after(5))
    return out


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"pipeflow: error: {message}"], result.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "model.colour=1"],
     "unknown config key model.colour; known in [model]: levels, steps, hidden, coupling, lu"),
    (["--set", "model.levels=two"], "model.levels must be an integer, got 'two'"),
    (["--set", "model.levels=0"], "model.levels = 0 must be at least 1"),
    (["--set", "model.steps=0"], "model.steps = 0 must be at least 1"),
    (["--set", "model.levels=4"], "image size 8 is not divisible by 2^model.levels = 16; lower model.levels"),
    (["--set", "parts.count=5"], "parts.count = 5 is more than the 4 flow steps of the model"),
    (["--set", "train.lr=-0.001"], "train.lr = -0.001 must be positive"),
    (["--set", "data.dataset=npz", "--set", "data.path=/nonexistent/digits.npz"],
     "data file /nonexistent/digits.npz does not exist"),
    (["--resume", "latest"], "--resume takes 'auto' (continue from the newest checkpoint in --out), not 'latest'"),
], ids=["unknown-key", "ill-typed", "levels", "steps", "image-size", "parts", "negative-lr", "missing-data",
        "resume-value"])
def test_bad_input_even_with_force_leaves_the_run_untouched(tmp_path, reference_run, args, message):
    config = write(tmp_path)
    before = snapshot(reference_run)
    refused(cli("train", "--config", str(config), "--out", str(reference_run), "--force", *args), message)
    assert snapshot(reference_run) == before


def test_a_malformed_dataset_file_is_refused(tmp_path, reference_run):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is no zip archive")
    before = snapshot(reference_run)
    result = cli("train", "--config", str(write(tmp_path)), "--out", str(reference_run), "--force", "--quiet",
                 "--set", "data.dataset=npz", "--set", f"data.path={bad}")
    refused(result, f"data file {bad} is not a readable .npz file (BadZipFile: File is not a zip file)")
    assert snapshot(reference_run) == before


def test_an_output_directory_holding_another_run_is_refused(tmp_path, reference_run):
    before = snapshot(reference_run)
    refused(cli("train", "--config", str(write(tmp_path)), "--out", str(reference_run), "--quiet"),
            f"output directory {reference_run} holds another run (config.toml); pass --resume auto to continue it "
            "or --force to replace it")
    assert snapshot(reference_run) == before


def test_resume_refuses_a_run_with_another_config(tmp_path, interrupted_run):
    before = snapshot(interrupted_run)
    refused(cli("train", "--config", str(write(tmp_path)), "--out", str(interrupted_run), "--quiet", "--resume", "auto",
                "--set", "model.hidden=16"),
            f"output directory {interrupted_run} holds a run with another config (model.hidden = 8 there, 16 here); "
            "resume it with its own config, or pass --force to replace it")
    assert snapshot(interrupted_run) == before


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path, interrupted_run):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    (run / "config.toml").unlink()  # only the checkpoint itself tells
    before = snapshot(run)
    refused(cli("train", "--config", str(write(tmp_path)), "--out", str(run), "--quiet", "--resume", "auto",
                "--set", "train.seed=7"),
            f"checkpoint {run / 'checkpoints' / 'rank0' / 'step-000000004.pt'} belongs to a run with another config "
            "(train.seed = 0 there, 7 here); resume with that run's config, or pass --force to start afresh")
    assert snapshot(run) == before


def test_resume_refuses_a_corrupt_checkpoint(tmp_path, interrupted_run):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    newest = run / "checkpoints" / "rank0" / "step-000000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by something other than pipeflow
    before = snapshot(run)
    refused(cli("train", "--config", str(write(tmp_path)), "--out", str(run), "--quiet", "--resume", "auto"),
            f"checkpoint {newest} is corrupt or not a pipeflow file (RuntimeError)")
    assert snapshot(run) == before


def test_eval_of_a_training_checkpoint_names_the_file_to_use(interrupted_run):
    checkpoint = interrupted_run / "checkpoints" / "rank0" / "step-000000004.pt"
    refused(cli("eval", "--checkpoint", str(checkpoint)),
            f"checkpoint {checkpoint} is not a pipeflow.model/1 file; it is a training checkpoint of one rank: "
            "use the run directory's model.pt, or continue the run with --resume auto")


def test_resume_auto_on_the_command_line_finishes_an_interrupted_run(tmp_path, interrupted_run, reference_run):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    result = cli("train", "--config", str(write(tmp_path)), "--out", str(run), "--quiet", "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert states_equal(run, reference_run) == 0.0


# --- many ranks: restarts, silent peers, non-finite steps ----------------------------------------


@pytest.fixture(scope="module")
def multi_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    config = write(folder, TINY_MULTI)
    ok(torchrun(2, config, folder / "reference"))
    return config, folder / "reference"


def test_killed_ranks_restart_under_torchrun_and_end_like_an_uninterrupted_run(tmp_path, multi_reference):
    config, reference = multi_reference
    out = tmp_path / "run"
    # attempt 0: rank 1 dies after by-parts step 3; attempt 1: rank 0 dies after fine-tuning step 13
    result = torchrun(2, config, out, restarts=2, env={"PIPEFLOW_TEST_FAULT": "exit:1:3@0,exit:0:13@1"})
    ok(result)
    assert "[rank 1] injected fault: exit after step 3" in result.stderr
    assert "[rank 0] injected fault: exit after step 13" in result.stderr
    assert "(resumed after step 13)" in result.stdout
    assert states_equal(out, reference) <= 1e-6
    assert comparable_metrics(out) == comparable_metrics(reference)
    mine, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert mine["comm"] == theirs["comm"] and mine["steps"] == theirs["steps"] == 15
    assert mine["test_bpd"] == theirs["test_bpd"]


def test_a_silent_rank_fails_every_other_rank_in_bounded_time(tmp_path):
    """Rank 1 of 3 stops (SIGSTOP) after step 3; ranks 0 and 2 must give up after distributed.timeout_s (12 s: the
    start-up of three processes on two busy cores must fit in it too)."""
    config = write(tmp_path, TINY_MULTI.replace("count = 2", "count = 3").replace("timeout_s = 30", "timeout_s = 12")
                   .replace("every_steps = 1", "every_steps = 0").replace("finetune_epochs = 1", "finetune_epochs = 0"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(3):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "3",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PIPEFLOW_TEST_FAULT": "stop:1:3"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeflow.launch", "--config", str(config), "--out",
                                       str(tmp_path / "run")], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        results = {}
        for rank in (0, 2):
            _, err = procs[rank].communicate(timeout=120)  # bounded: startup, 3 steps, then 12 s of silence
            results[rank] = (procs[rank].returncode, err)
        assert procs[1].poll() is None  # still stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    code0, err0 = results[0]
    code2, err2 = results[2]
    assert code0 == 1 and code2 == 1
    assert launch_lines(err0, "failed") == [launch_lines(err0, "failed")[0]]
    assert launch_lines(err0, "failed")[0].startswith(
        "pipeflow.launch: failed (rank 0): rank 0 could not send to rank 1: rank 1 took nothing for 12 s "
        "(distributed.timeout_s), or the link broke:")
    assert launch_lines(err2, "failed")[0].startswith(
        "pipeflow.launch: failed (rank 2): rank 2 heard nothing from rank 1 for 12 s (distributed.timeout_s), "
        "or lost the link:")
    assert "Traceback" not in err0 + err2


def test_non_finite_steps_across_ranks_are_skipped_counted_then_stop_the_run(tmp_path, multi_reference):
    config, _ = multi_reference
    # one NaN batch into stage 0: stage 0 skips it, and so does stage 1 (its input is NaN too)
    ok(torchrun(2, config, tmp_path / "once", env={"PIPEFLOW_TEST_FAULT": "nan:0:3"}))
    assert json.loads((tmp_path / "once" / "summary.json").read_text())["skipped_steps"] == 2
    # NaN from step 2 on into stage 1: after train.max_bad_steps = 3 in a row, the run stops
    out = tmp_path / "diverged"
    result = torchrun(2, config, out, "--set", "train.max_bad_steps=3", env={"PIPEFLOW_TEST_FAULT": "nan:1:2-10"})
    assert result.returncode != 0
    assert launch_lines(result.stderr, "failed (rank 1)") == [
        "pipeflow.launch: failed (rank 1): part 1 (rank 1): 3 non-finite losses in a row (train.max_bad_steps); "
        f"lower train.lr or raise train.warmup_steps; the newest checkpoint in {out / 'checkpoints' / 'rank1'}, "
        "of step 3, holds the parameters of step 1, the last good one (a skipped step changes nothing): "
        "--resume auto continues from it, e.g. with a lower train.lr"]
    # ... and continues from the newest step both ranks saved
    result = torchrun(2, config, out, "--resume", "auto", "--set", "train.max_bad_steps=3")
    ok(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["skipped_steps"] == 2 and summary["steps"] == 15


def test_launch_resume_refuses_another_world_size_or_config(tmp_path, multi_reference):
    config, reference = multi_reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()  # as if interrupted after its last checkpoint
    before = snapshot(run)
    result = torchrun(4, config, run, "--resume", "auto")  # 2 replicas of the 2 parts
    assert "exitcode  : 2" in result.stderr
    assert sorted(launch_lines(result.stderr, "error")) == [
        f"pipeflow.launch: error (rank {r}): the checkpoints of rank 0 were written by 2 processes running 2 parts, "
        "not 4 running 2: resume with the same number of processes, or pass --force to start afresh" for r in range(4)]
    result = torchrun(2, config, run, "--resume", "auto", "--set", "train.batch_size=16")
    assert "exitcode  : 2" in result.stderr
    assert launch_lines(result.stderr, "error (rank 0)") == [
        f"pipeflow.launch: error (rank 0): output directory {run} holds a run with another config "
        "(train.batch_size = 32 there, 16 here); resume it with its own config, or pass --force to replace it"]
    # nor can one device resume what several ranks saved
    with pytest.raises(UserError, match=r"written by pipeflow.launch on 2 process\(es\): resume that run with"):
        train(load_config(config), run, resume=True)
    assert snapshot(run) == before
