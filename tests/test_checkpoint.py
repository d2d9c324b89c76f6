"""Checkpoints on one device: the store's atomic, listed and pruned files, run files that stay strict JSON,
which config changes make another run, and a killed run resumed to exactly the uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from pipeflow.checkpoint import CheckpointStore, atomic_write_json, config_difference
from pipeflow.config import with_overrides
from pipeflow.data import Batches
from pipeflow.errors import UserError
from support import Crash, comparable_metrics, crash_after, max_difference, ok, pipeflow, snapshot, summary

# internals of the training core that issue 10's rewrite may rename: train(..., after_step=, resume=)
from pipeflow.train import train


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


@pytest.mark.parametrize("crash_at", [2, 3, 5, 8])  # mid-epoch checkpoint, epoch end, by parts, fine-tuning
def test_one_device_resumes_to_the_uninterrupted_parameters(tmp_path, checkpointed_cfg, reference_run, crash_at):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(checkpointed_cfg, out, after_step=crash_after(crash_at))
    assert not (out / "summary.json").exists()
    resumed = train(checkpointed_cfg, out, resume=True)
    assert resumed["resumed_from_step"] == {2: 2, 3: 3, 5: 4, 8: 8}[crash_at]  # epoch ends checkpoint too
    assert max_difference(out, reference_run) == 0.0
    assert comparable_metrics(out) == comparable_metrics(reference_run)
    reference = summary(reference_run)
    assert resumed["test_bpd"] == reference["test_bpd"] and resumed["steps"] == reference["steps"]
    # resuming a finished run changes nothing
    before = snapshot(out)
    assert train(checkpointed_cfg, out, resume=True)["test_bpd"] == resumed["test_bpd"]
    assert snapshot(out) == before


def test_checkpoints_are_kept_per_rank_with_a_manifest(reference_run, checkpointed_cfg):
    folder = reference_run / "checkpoints" / "rank0"
    manifest = json.loads((folder / "manifest.json").read_text())
    steps = [e["step"] for e in manifest["checkpoints"]]
    # every 2 steps and after every epoch (3 steps each, 9 in all); the newest 3 kept
    assert steps == [6, 8, 9]
    assert sorted(p.name for p in folder.glob("*.pt")) == [e["file"] for e in manifest["checkpoints"]]
    blob = torch.load(folder / "step-000000008.pt", weights_only=True)
    assert blob["step"] == 8 and blob["phase"] == "finetune" and blob["config"] == checkpointed_cfg.to_dict()
    assert blob["run"]["step"] == 8 and blob["run"]["phase"] == "finetune" and blob["entry"] == "train"
    assert {"modules", "trainers", "run", "rng", "metrics_bytes"} <= blob.keys()
    # the averaged weights (train.eval_ema) travel too, with their count of updates (their warm-up)
    assert blob["average"]["updates"] == 8 and blob["average"]["shadow"]
    assert all(torch.is_tensor(t) for t in blob["average"]["shadow"])


def test_resume_auto_on_the_command_line_finishes_an_interrupted_run(tmp_path, checkpointed_config_path,
                                                                     interrupted_run, reference_run):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    ok(pipeflow("train", "--config", checkpointed_config_path, "--out", run, "--quiet", "--resume", "auto"))
    assert max_difference(run, reference_run) == 0.0


def test_a_checkpoint_without_an_average_resumes_with_a_fresh_one_and_a_misfit_one_is_refused(glow):
    from pipeflow.averaging import WeightAverage
    from pipeflow.state import RunState, restore

    average = WeightAverage(glow, 0.9)
    blob = {"modules": [], "trainers": [], "run": RunState().to_dict(), "rng": {"torch": torch.get_rng_state()},
            "step": 4, "rank": 0}
    restore({**blob, "average": None}, [], [], torch.device("cpu"), average)  # taken with train.eval_ema off
    assert average.shadow is None and average.updates == 0
    for _ in range(3):
        average.update()
    saved = average.state_dict()
    again = WeightAverage(glow, 0.9)
    restore({**blob, "average": saved}, [], [], torch.device("cpu"), again)
    assert again.updates == 3 and all(torch.equal(a, b) for a, b in zip(again.shadow, average.shadow))
    with pytest.raises(UserError, match="step 4 .*does not fit this run: the averaged weights do not match"):
        restore({**blob, "average": {**saved, "shadow": saved["shadow"][:-1]}}, [], [], torch.device("cpu"), again)
