"""Numerical guards: a non-finite step is skipped (it changes nothing) and counted, too many in a row stop the
run at its last good checkpoint, from which it resumes; a singular layer is an error naming it, not a NaN.

The multi-rank test injects NaN batches with ``tests/faults.py`` (``pipeflow.launch`` with the failures
that PIPEFLOW_TEST_FAULT names)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeflow.build import build_run
from pipeflow.config import with_overrides
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.parts import whole_model_part
from support import CHECKPOINTED_MULTIRANK, launch_lines, max_difference, ok, summary, torchrun, write_config

# internals of the training core that issue 10's rewrite may rename
from pipeflow.part_trainer import PartTrainer, TrainingDiverged, check_invertible
from pipeflow.train import train


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
        _, loss, _ = trainer.train_step(bad, torch.zeros(len(x)))
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


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_without_clipping(tiny_config):
    """train.grad_clip = 0 computes no norm to clip with, yet the step is checked as the pipelined phase
    checks it: a NaN in one gradient (put there by the gradient hook) skips the step."""
    run, trainer, x = _trainer(with_overrides(tiny_config, ["train.grad_clip=0"]))
    trainer.train_step(x, torch.zeros(len(x)))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    trainer.grad_hook = lambda grads: grads[0].view(-1)[0].fill_(float("nan"))
    _, loss, _ = trainer.train_step(x, torch.zeros(len(x)))
    assert math.isfinite(loss) and (trainer.skipped, trainer.steps) == (1, 1)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())


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


# --- whole runs on one device ----------------------------------------------------------------------------


def test_divergence_stops_with_the_last_good_checkpoint_and_resumes_from_it(tmp_path, checkpointed_cfg,
                                                                          reference_run, monkeypatch):
    import pipeflow.data as data

    cfg = with_overrides(checkpointed_cfg, ["train.max_bad_steps=2"])
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
    resumed = train(cfg, out, resume=True)
    assert resumed["resumed_from_step"] == 4 and resumed["skipped_steps"] == 0
    assert max_difference(out, reference_run) == 0.0  # the skipped steps changed nothing


def test_a_skipped_step_is_counted_in_the_summary(tmp_path, checkpointed_cfg, monkeypatch):
    import pipeflow.data as data

    real = data.dequantize
    calls = {"n": 0}

    def dequantize(*args, **kwargs):  # the 3rd batch drawn is step 2's (after the init batch and step 1's)
        calls["n"] += 1
        x = real(*args, **kwargs)
        return x * float("nan") if calls["n"] == 3 else x

    monkeypatch.setattr(data, "dequantize", dequantize)
    result = train(checkpointed_cfg, tmp_path / "run")
    assert result["skipped_steps"] == 2  # part 0 on the NaN batch, and part 1 on part 0's NaN output
    assert math.isfinite(result["test_bpd"])


def test_an_overflowing_test_image_is_counted_beside_the_mean_it_spoils(tmp_path, checkpointed_cfg, monkeypatch):
    """One test image whose log-likelihood is not finite makes the test bits/dim not finite (a mean over every
    image, as it should be), the averaged weights' too; each evaluation record says how many images did it."""
    import pipeflow.build as build

    real = build.test_batches

    def test_batches(*args, **kwargs):
        batches = real(*args, **kwargs)
        epoch = batches.epoch

        def spoiled(e, start=0):
            for b, x in enumerate(epoch(e, start)):
                yield torch.cat([x[:1] * float("inf"), x[1:]]) if b == 0 else x
        batches.epoch = spoiled
        return batches

    monkeypatch.setattr(build, "test_batches", test_batches)
    cfg = with_overrides(checkpointed_cfg, ["train.eval_ema=0.9"])
    train(cfg, tmp_path / "run")
    assert_evaluations_count_one_image(tmp_path / "run", {"by_parts", "finetune"})


def assert_evaluations_count_one_image(run, phases: set[str]) -> None:
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    evals = [r for r in evals if r["phase"] in phases]
    assert {r["phase"] for r in evals} == phases
    for record in evals:  # strict JSON: null for a mean that is not finite
        assert record["test_nonfinite"] == 1 and record["test_bpd"] is None, record
        assert record.get("test_bpd_ema", None) is None


# --- across ranks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["ddp", "pipeline"])
def test_an_overflowing_test_image_is_counted_across_ranks_too(tmp_path, finetune):
    """By parts on 2 stages, then DDP's or the pipelined fine-tuning (each with its own evaluation), rank 0's
    first test image infinite: rank 0's record of every evaluation, in both phases, names the one image."""
    config = write_config(tmp_path, CHECKPOINTED_MULTIRANK, {"distributed.finetune": finetune})
    ok(torchrun(2, config, tmp_path / "run", env={"PIPEFLOW_TEST_FAULT": "inf:0:eval"}))
    assert_evaluations_count_one_image(tmp_path / "run", {"by_parts", "finetune"})


def test_non_finite_steps_across_ranks_are_skipped_counted_then_stop_the_run(tmp_path):
    config = write_config(tmp_path, CHECKPOINTED_MULTIRANK)
    # one NaN batch into stage 0: stage 0 skips it, and so does stage 1 (its input is NaN too)
    ok(torchrun(2, config, tmp_path / "once", env={"PIPEFLOW_TEST_FAULT": "nan:0:3"}))
    assert summary(tmp_path / "once")["skipped_steps"] == 2
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
    ok(torchrun(2, config, out, "--resume", "auto", "--set", "train.max_bad_steps=3"))
    resumed = summary(out)
    assert resumed["resumed_from_step"] == 3 and resumed["skipped_steps"] == 2 and resumed["steps"] == 15
