"""Fine-tuning without gathering (distributed.finetune = "pipeline"), under torchrun with gloo on CPU.

Each part stays on its rank and the glued flow trains end to end through
torch.distributed.pipelining. Its microbatches' mean gradient is the whole batch's gradient, so
the run must end where `pipeflow train` ends on one device (which fine-tunes on whole batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import (MULTIRANK, assert_replicas_equal, comparable_metrics, max_difference, in_process, metrics, ok,
                     summary, torchrun, write_config)


def pipelined_config(tmp_path: Path, parts: int, **more) -> Path:
    """One epoch by parts, one of fine-tuning through the pipeline (5 steps of 32 images each)."""
    return write_config(tmp_path, MULTIRANK, {"parts.count": parts, "train.by_parts_epochs": 1,
                                              "train.finetune_epochs": 1, "distributed.finetune": "pipeline"},
                        more, name=f"pipelined_p{parts}.toml")


@pytest.mark.parametrize("parts, schedule, clip", [(2, "1f1b", 0.5), (3, "gpipe", 0.0)])
def test_pipelined_finetuning_equals_one_device(tmp_path, parts, schedule, clip):
    """2 ranks: 1F1B with clipping that acts (the whole flow's norm, summed over the stages);
    3 ranks: GPipe without clipping. Both as one device's end-to-end steps on whole batches."""
    config = pipelined_config(tmp_path, parts, **{"distributed.pipeline_schedule": schedule,
                                                  "distributed.microbatches": 4, "train.grad_clip": clip})
    ok(torchrun(parts, config, tmp_path / "pipe"))
    in_process("train", "--config", config, "--out", tmp_path / "single", "--quiet")
    assert max_difference(tmp_path / "pipe", tmp_path / "single") <= 1e-5
    run, single = summary(tmp_path / "pipe"), summary(tmp_path / "single")
    assert run["test_bpd"] == pytest.approx(single["test_bpd"], abs=1e-5)
    finetune = run["phases"]["finetune"]
    assert finetune["schedule"] == schedule and finetune["images_per_process"] == 5 * 32
    assert finetune["test_bpd"] < run["phases"]["by_parts"]["test_bpd"]
    # gradients travel back in this phase only; the parts were gathered for model.pt alone
    assert run["comm"]["backward_bytes"] == 0 and run["comm"]["finetune_backward_bytes"] > 0
    steps = [r for r in metrics(tmp_path / "pipe") if r["kind"] == "step" and r["phase"] == "finetune"]
    assert [r["step"] for r in steps] == [6, 7, 8, 9, 10]
    evals = [r["test_bpd"] for r in metrics(tmp_path / "pipe") if r["kind"] == "eval" and r["phase"] == "finetune"]
    assert evals == [pytest.approx(run["test_bpd"])]
    in_process("eval", "--checkpoint", tmp_path / "pipe" / "model.pt", "--json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["test_bpd"] == pytest.approx(run["test_bpd"], abs=1e-5)


def test_a_killed_pipelined_fine_tuning_resumes_to_the_uninterrupted_parameters(tmp_path):
    """Every rank checkpoints its own part in this phase (nothing is gathered): a rank killed inside it
    restarts under torchrun from the newest step every rank saved, and ends as the uninterrupted run,
    its averaged weights' bits/dim (train.eval_ema) included."""
    config = pipelined_config(tmp_path, 2, **{"checkpoint.every_steps": 1, "checkpoint.keep": 8,
                                              "distributed.microbatches": 4, "train.eval_ema": 0.9})
    ok(torchrun(2, config, tmp_path / "reference"))
    result = torchrun(2, config, tmp_path / "run", restarts=1, env={"PIPEFLOW_TEST_FAULT": "exit:1:8"})
    ok(result)
    assert "[rank 1] injected fault: exit after step 8" in result.stderr  # step 3 of fine-tuning
    assert "(resumed after step 8)" in result.stdout
    assert max_difference(tmp_path / "run", tmp_path / "reference") == 0.0
    assert comparable_metrics(tmp_path / "run") == comparable_metrics(tmp_path / "reference")
    mine, theirs = summary(tmp_path / "run"), summary(tmp_path / "reference")
    assert mine["test_bpd"] == theirs["test_bpd"] and mine["comm"] == theirs["comm"]  # bytes of both attempts


@pytest.mark.parametrize("by_parts", [1, 0])
def test_two_replicas_of_a_pipelined_two_stage_flow(tmp_path, by_parts):
    """P x R = 2 x 2: each replica's stages fine-tune half of every batch and average their gradients
    over the replicas, so the run ends where one device ends on whole batches, up to the order of
    floating-point sums (as the replicated by-parts phase does): after an epoch by parts (the parts'
    moments carried on), and from the start, where rank 2 (replica 1 of stage 0) builds other weights
    and its stage starts from replica 0's. Either way the replicas end equal to the bit."""
    config = pipelined_config(tmp_path, 2, **{"distributed.microbatches": 2, "train.grad_clip": 0.5,
                                              "train.by_parts_epochs": by_parts, "train.finetune_epochs": 1})
    result = torchrun(4, config, tmp_path / "pipe", env={} if by_parts else {"PIPEFLOW_TEST_FAULT": "skew:2:build"})
    ok(result)
    assert ("[rank 2] injected fault: skew build" in result.stderr) == (not by_parts)
    assert_replicas_equal(tmp_path / "pipe")
    in_process("train", "--config", config, "--out", tmp_path / "single", "--quiet")
    run = summary(tmp_path / "pipe")
    assert run["replicas"] == 2 and run["comm"]["finetune_allreduce_bytes"] > 0
    assert run["phases"]["finetune"]["images_per_process"] == 5 * 32 // 2
    assert max_difference(tmp_path / "pipe", tmp_path / "single") < 1e-3
    assert run["test_bpd"] == pytest.approx(summary(tmp_path / "single")["test_bpd"], abs=1e-3)


def test_bytes_sent_are_one_latent_and_carry_per_image_each_way(tmp_path):
    config = pipelined_config(tmp_path, 2, **{"distributed.pipeline_schedule": "gpipe"})
    ok(torchrun(2, config, tmp_path / "pipe"))
    comm = summary(tmp_path / "pipe")["comm"]
    per_image = 4 * (4 * 4 * 4 + 1)  # the cut's 4x4x4 latent and the carry, forwards; their gradients back
    assert comm["finetune_forward_bytes"] == comm["finetune_backward_bytes"] == per_image * 5 * 32


def test_microbatches_that_do_not_divide_the_batch_are_refused_before_training(tmp_path):
    config = pipelined_config(tmp_path, 2, **{"distributed.microbatches": 5})
    result = torchrun(2, config, tmp_path / "pipe", timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pipeflow.launch: error")]
    assert sorted(errors) == [f"pipeflow.launch: error (rank {r}): train.batch_size = 32 must be a multiple of "
                              "distributed.microbatches = 5 for pipelined fine-tuning" for r in range(2)]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "pipe").exists()


def test_1f1b_with_fewer_microbatches_than_stages_is_refused_before_training(tmp_path):
    """torch's 1F1B schedule raises only when fine-tuning begins, after the whole by-parts phase."""
    config = pipelined_config(tmp_path, 3, **{"distributed.microbatches": 2, "distributed.pipeline_schedule": "1f1b"})
    result = torchrun(3, config, tmp_path / "pipe", timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pipeflow.launch: error")]
    assert sorted(errors) == [f"pipeflow.launch: error (rank {r}): distributed.microbatches = 2 must be at least "
                              "the 3 stages for the 1f1b schedule (or distributed.pipeline_schedule = 'gpipe')"
                              for r in range(3)]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "pipe").exists()


def _run(name: str, kind: str, images_per_s: float, peaks: list[int]) -> dict:
    return {"name": name, "kind": kind, "images_per_s": images_per_s, "bandwidth": 0.0,
            "ranks": [{"peak_memory_bytes": p} for p in peaks]}


@pytest.mark.parametrize("pipeline_speed, pipeline_peak, met", [(120.0, [5, 9], [True, True]),
                                                                 (119.0, [5, 9], [False, True]),
                                                                 (200.0, [5, 11], [True, False])])
def test_the_targets_against_gpipe_and_1f1b_flip_at_their_thresholds(pipeline_speed, pipeline_peak, met):
    from pipeflow.tools.bench import _pipelined_targets

    runs = [_run("pipeline across x2", "pipeline", pipeline_speed, pipeline_peak),
            _run("gpipe x2", "pipelined", 80.0, [10, 12]), _run("1f1b x2", "pipelined", 100.0, [10, 11])]
    targets = _pipelined_targets(runs)
    assert [t["met"] for t in targets] == met
    assert targets[0]["note"] == "against 1f1b x2"  # the better of the two peers


def test_only_the_last_stage_evaluates_a_prior():
    """Fine-tuning trains the glued flow: a boundary prior (the `flow` head: two flow steps) has no term in
    it, so a middle stage must not spend a forward pass on it; the last stage adds the model's top prior."""
    import torch

    from conftest import make_glow
    from pipeflow.objective import PartLikelihood
    from pipeflow.parts import split_into_parts
    from pipeflow.pipelined_finetune import StageLikelihood

    model = make_glow(levels=2, steps=2)
    first, last = split_into_parts(model, "across", 2, boundary_prior="flow")

    def never(h):
        raise AssertionError("the boundary prior ran in fine-tuning")

    first.prior.log_prob = never
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5
    h, carry = StageLikelihood(PartLikelihood(first), True, False)(x)
    h_ref, logdet, logp_factored = first(x)
    assert torch.equal(h, h_ref) and torch.equal(carry, logdet + logp_factored)
    log_p = StageLikelihood(PartLikelihood(last), False, True)(h, carry)
    assert torch.allclose(log_p, model.log_prob(x))  # the glued flow's log-likelihood
