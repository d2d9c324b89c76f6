"""train.find_lr_steps: a learning-rate range test per part, which leaves the parts as they were."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeflow.build import build_run
from pipeflow.config import with_overrides
from pipeflow.errors import UserError
from pipeflow.lr_find import LR_MAX, LR_MIN, find_part_lrs, pick_lr, range_lrs
from pipeflow.train import train

STEPS = 12


def test_range_rises_exponentially_from_the_lowest_to_the_highest_rate():
    lrs = range_lrs(STEPS)
    assert lrs[0] == pytest.approx(LR_MIN) and lrs[-1] == pytest.approx(LR_MAX)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(ratios[0]) and r > 1 for r in ratios)


def test_pick_is_a_tenth_of_the_rate_at_the_lowest_smoothed_loss():
    lrs = range_lrs(40)
    # falls to its lowest at step 25, then climbs and blows up
    losses = [10.0 - 0.3 * i for i in range(26)] + [2.5 + 2.0 * i for i in range(1, 10)] + [math.nan] * 5
    lr = pick_lr(lrs, losses)
    assert LR_MIN <= lr <= LR_MAX
    best = min(range(len(lrs)), key=lambda i: abs(lrs[i] - 10 * lr))
    assert 24 <= best <= 27  # smoothing lags the raw minimum by a step or two
    assert pick_lr(lrs, [math.inf] * 40) == LR_MIN  # nothing finite: the lowest rate


@pytest.fixture
def run(tiny_config):
    return build_run(with_overrides(tiny_config, ["parts.count=3", "train.schedule=alternate"]))


def test_range_test_leaves_the_parts_as_they_were_and_is_deterministic(run):
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in (run.model, *run.parts)]
    first = find_part_lrs(run, torch.device("cpu"), STEPS)
    for module, state in zip((run.model, *run.parts), before):
        after = module.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(bool(m.initialized) for m in run.model.modules() if hasattr(m, "initialized"))  # not even ActNorm
    assert [r["part"] for r in first] == [0, 1, 2]
    for r in first:
        assert LR_MIN <= r["lr"] <= LR_MAX / 10
        assert len(r["losses"]) == len(r["lrs"]) and 0 < len(r["losses"]) <= STEPS
    again = find_part_lrs(run, torch.device("cpu"), STEPS)
    assert again == first


def test_a_run_trains_each_part_at_its_found_rate(tmp_path, tiny_config):
    cfg = with_overrides(tiny_config, ["train.find_lr_steps=8", "train.samples=0", "train.finetune_epochs=0"])
    summary = train(cfg, tmp_path / "run")
    found = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "lr_find"]
    assert [r["part"] for r in found] == [0, 1]
    assert summary["part_lrs"] == [r["lr"] for r in found]
    assert summary["part_lrs"] == [r["lr"] for r in find_part_lrs(build_run(cfg), torch.device("cpu"), 8)]
    assert math.isfinite(summary["test_bpd"])


@pytest.mark.parametrize("overrides", [["train.find_lr_steps=5", "train.part_lrs=[1e-3, 1e-3]"],
                                       ["train.find_lr_steps=5", "train.schedule=e2e"],
                                       ["train.find_lr_steps=-1"]])
def test_find_lr_refuses_what_contradicts_it(tiny_config, overrides):
    with pytest.raises(UserError, match="find_lr_steps"):
        with_overrides(tiny_config, overrides)


def test_a_resumed_run_keeps_the_rates_it_found(tmp_path, checkpointed_cfg, monkeypatch):
    """The rates are part of the run state: a resumed run trains at the rates it started with (no second
    range test, which a GPU's non-deterministic kernels could end elsewhere) and ends as the uninterrupted run."""
    from support import Crash, comparable_metrics, crash_after, max_difference

    cfg = with_overrides(checkpointed_cfg, ["train.find_lr_steps=4"])
    reference = train(cfg, tmp_path / "reference")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", after_step=crash_after(3))
    monkeypatch.setattr("pipeflow.train.find_part_lrs", lambda *args: pytest.fail("the range tests ran again"))
    resumed = train(cfg, tmp_path / "run", resume=True)
    assert resumed["part_lrs"] == reference["part_lrs"] != [cfg.train.lr, cfg.train.lr]
    assert max_difference(tmp_path / "run", tmp_path / "reference") == 0.0
    assert comparable_metrics(tmp_path / "run") == comparable_metrics(tmp_path / "reference")
