"""Multi-rank runs under torchrun (gloo, CPU, tiny model), compared with the single-device simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeflow.build import build_model, build_parts
from pipeflow.config import load_config
from support import (ENV, MULTIRANK, assert_replicas_equal, in_process, max_difference, metrics, ok, ranks_of_script,
                     summary, torchrun, write_config)

# internals of the training core that issue 10's rewrite may rename or move
from pipeflow.multirank import place_own_part, place_whole_model


def multirank_config(tmp_path: Path, parts: int = 2, finetune: int = 0, **more) -> Path:
    """support.MULTIRANK with ``parts`` parts and ``finetune`` epochs of fine-tuning."""
    return write_config(tmp_path, MULTIRANK, {"parts.count": parts, "train.finetune_epochs": finetune}, more,
                        name=f"tiny_p{parts}_f{finetune}.toml")


def single_device(config: Path, out: Path, *extra: str) -> dict:
    """`pipeflow train` of the same config on one device: its summary."""
    in_process("train", "--config", config, "--out", out, "--quiet", *extra)
    return summary(out)


@pytest.mark.parametrize("parts", [2, 3])
def test_pipeline_ranks_equal_single_device_pipeline(tmp_path, parts):
    """With train.eval_ema too: each stage averages its own part, and the averaged glued flow is evaluated
    through the pipeline (EVAL_EMA messages) as one device evaluates its average of the whole model;
    and with train.lr_schedule each stage decays its rate over the run's steps as one device does."""
    config = multirank_config(tmp_path, parts=parts, **{"train.eval_ema": 0.9, "train.lr_schedule": "cosine"})
    # how many batches may wait for the wire changes when work happens, never what is computed
    in_flight = {2: 2, 3: 1}[parts]
    ok(torchrun(parts, config, tmp_path / "dist", "--set", f"distributed.in_flight={in_flight}"))
    single = single_device(config, tmp_path / "single")
    assert max_difference(tmp_path / "dist", tmp_path / "single") <= 1e-6
    run = summary(tmp_path / "dist")
    assert run["parts"] == parts and run["world_size"] == parts
    assert run["test_bpd"] == pytest.approx(single["test_bpd"], abs=1e-5)
    averaged = [[r["test_bpd_ema"] for r in summary_["history"]] for summary_ in (run, single)]
    assert averaged[0] == pytest.approx(averaged[1], abs=1e-5) and len(averaged[0]) == 2
    assert averaged[0][-1] != pytest.approx(run["test_bpd"], abs=1e-3)  # the average is not the weights
    # nothing travels backwards; forward traffic is exactly one latent (+ carry and header) per image
    assert run["comm"]["backward_bytes"] == 0
    assert run["comm"]["forward_bytes"] > 0
    records = metrics(tmp_path / "dist")
    steps = [r for r in records if r["kind"] == "step"]
    assert {r["part"] for r in steps} == set(range(parts))
    assert all({"loss", "prefix_bpd", "images_per_s", "busy_fraction"} <= r.keys() for r in steps)
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert all(0 < r["busy_fraction"] <= 1 for r in run["ranks"])


def test_averaged_feed_found_rates_and_a_learned_boundary_prior_on_ranks_equal_one_device(tmp_path):
    """train.feed_ema: stage 1 sends the output of its averaged weights, as one device hands it on;
    train.find_lr_steps: rank 0 runs the range tests as one device does, and each stage trains at its part's rate."""
    config = multirank_config(tmp_path, parts=2, **{"train.feed_ema": 0.9, "parts.boundary_prior": "conditional",
                                                    "train.find_lr_steps": 6})
    ok(torchrun(2, config, tmp_path / "dist"))
    single = single_device(config, tmp_path / "single")
    plain = single_device(config, tmp_path / "plain", "--set", "train.feed_ema=0.0")
    found = summary(tmp_path / "dist")["part_lrs"]
    assert found == single["part_lrs"] and found != [2e-3, 2e-3]  # found, not the config's train.lr
    assert [r["part"] for r in metrics(tmp_path / "dist") if r["kind"] == "lr_find"] == [0, 1]
    assert max_difference(tmp_path / "dist", tmp_path / "single") <= 1e-6
    assert summary(tmp_path / "dist")["test_bpd"] == pytest.approx(single["test_bpd"], abs=1e-5)
    assert plain["test_bpd"] != pytest.approx(single["test_bpd"], abs=1e-5)  # the feed changed what part 2 learnt


def test_forward_bytes_are_one_latent_per_image(tmp_path):
    config = multirank_config(tmp_path, parts=2)
    ok(torchrun(2, config, tmp_path / "dist"))
    run = summary(tmp_path / "dist")
    # the cut after 1 step of level 1 (1x8x8 digits -> 4x4x4): 64 floats + 1 carry per image, 32 B per header
    per_image = 4 * (4 * 4 * 4 + 1)
    images = 32 + 2 * 5 * 32 + 2 * 96  # init batch, 2 epochs x 5 steps x 32, 2 evaluations of 96
    headers = 1 + 2 * 5 + 2 * (1 + 1) + 1  # init, train, eval batches + eval ends, stop
    assert run["comm"]["forward_bytes"] == per_image * images + 32 * headers


def test_finetune_ddp_improves_and_model_loads_alone(tmp_path):
    """Over a slow link, too: ``--bandwidth`` at 40 kB/s per rank holds back the forward sends (about 8 kB
    a step) and DDP's gradient all-reduce (about 4 bytes per parameter), and changes nothing computed."""
    config = multirank_config(tmp_path, parts=2, finetune=3)
    result = torchrun(2, config, tmp_path / "dist", "--bandwidth", "40000")
    ok(result)
    run = summary(tmp_path / "dist")
    assert run["phases"]["finetune"]["schedule"] == "ddp"
    # each of the 2 ranks trains on its half of every batch: 3 epochs x 5 steps x 32 images / 2
    assert run["phases"]["finetune"]["images_per_process"] == 3 * 5 * 32 // 2
    assert run["test_bpd"] < run["phases"]["by_parts"]["test_bpd"]
    assert run["comm"]["backward_bytes"] == 0 and run["comm"]["finetune_allreduce_bytes"] > 0
    assert run["comm"]["forward_paced_seconds"] > 0 and run["comm"]["finetune_paced_seconds"] > 0
    in_process("eval", "--checkpoint", tmp_path / "dist" / "model.pt", "--json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["test_bpd"] == pytest.approx(run["test_bpd"], abs=1e-5)


def test_finetune_on_rank0_equals_one_device_and_ddp_is_close(tmp_path):
    """With train.eval_ema, pipelined fine-tuning (each stage averages its own part, the glued average
    evaluated through the pipeline) evaluates the average rank 0 evaluates on the whole model. With
    train.lr_schedule, every mode decays its rates over the same steps of the run as one device."""
    config = multirank_config(tmp_path, parts=2, finetune=2, **{"train.eval_ema": 0.9, "train.lr_schedule": "cosine"})
    ok(torchrun(2, config, tmp_path / "ddp"))
    ok(torchrun(2, config, tmp_path / "rank0", "--set", "distributed.finetune=rank0"))
    ok(torchrun(2, config, tmp_path / "pipe", "--set", "distributed.finetune=pipeline"))
    single = single_device(config, tmp_path / "single")
    rank0 = summary(tmp_path / "rank0")
    # rank 0 alone sees every image of the 2 fine-tuning epochs, as one device does
    assert rank0["phases"]["finetune"]["images_per_process"] == single["phases"]["finetune"]["images_per_process"]
    assert single["phases"]["finetune"]["images_per_process"] == 2 * 5 * 32
    # by parts on 2 ranks, then the parts and their optimiser states gathered and fine-tuned
    # on rank 0: the very run `pipeflow train` makes on one device
    assert max_difference(tmp_path / "rank0", tmp_path / "single") <= 1e-6
    # DDP: the same full-batch gradient, summed in another order
    assert max_difference(tmp_path / "ddp", tmp_path / "rank0") < 1e-3
    # carrying the optimiser states on is what makes them equal: a fresh optimiser differs
    ok(torchrun(2, config, tmp_path / "fresh", "--set", "distributed.finetune=rank0",
                "--set", "train.finetune_optimizer=fresh"))
    assert max_difference(tmp_path / "fresh", tmp_path / "single") > 1e-3
    gathered = {run: summary(tmp_path / run)["comm"]["gather_bytes"]
                for run in ("rank0", "fresh")}
    assert gathered["rank0"] > 2 * gathered["fresh"]  # parameters, then Adam's two moments of each
    averaged = {run: [r["test_bpd_ema"] for r in summary(tmp_path / run)["history"] if r["phase"] == "finetune"]
                for run in ("pipe", "rank0")}
    assert averaged["pipe"] == pytest.approx(averaged["rank0"], abs=1e-4) and len(averaged["pipe"]) == 2
    assert averaged["pipe"][-1] != pytest.approx(summary(tmp_path / "pipe")["test_bpd"], abs=1e-3)  # not the weights


def test_finetune_alone_initialises_every_replica_from_the_whole_first_batch(tmp_path):
    """No by-parts epochs: DDP starts from ActNorms initialised on the whole first batch on every
    rank (not each on its own shard), so it ends where one device does."""
    config = multirank_config(tmp_path, parts=2, finetune=1, **{"train.by_parts_epochs": 0})
    ok(torchrun(2, config, tmp_path / "ddp"))
    single_device(config, tmp_path / "single")
    assert max_difference(tmp_path / "ddp", tmp_path / "single") < 1e-3


AVERAGE = """
import json, sys
import torch, torch.distributed as dist
from pipeflow.distributed.collectives import gradient_averager

dist.init_process_group("gloo")
rank = dist.get_rank()
grads = [torch.tensor([1.0, 2.0]) + 2 * rank, torch.full((2, 2), 10.0 * (rank + 1))]
average = gradient_averager(None, dist.get_world_size())
average(grads)
json.dump({"grads": [g.tolist() for g in grads], "bytes": average.bytes}, open(sys.argv[1] + str(rank), "w"))
dist.destroy_process_group()
"""


def test_stage_replicas_average_their_gradients(tmp_path):
    """What the replicas of one stage exchange: the mean of their gradients, every tensor of it."""
    for out in ranks_of_script(AVERAGE, tmp_path):
        assert out["grads"] == [[2.0, 3.0], [[15.0, 15.0], [15.0, 15.0]]]
        assert out["bytes"] == 6 * 4


def test_two_replicas_of_a_two_stage_pipeline(tmp_path):
    # the standard prior: with the flow head the two summation orders ended 1.4e-3 apart, over this
    # tolerance (more layers for rounding to reach); the replicas' exact agreement with it is tested below
    config = multirank_config(tmp_path, parts=2, **{"parts.boundary_prior": "standard"})
    ok(torchrun(4, config, tmp_path / "dist"))
    single_device(config, tmp_path / "single")
    run = summary(tmp_path / "dist")
    assert run["replicas"] == 2 and run["world_size"] == 4
    assert run["comm"]["backward_bytes"] == 0 and run["comm"]["stage_allreduce_bytes"] > 0
    assert {(r["stage"], r["replica"]) for r in run["ranks"]} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    # each replica takes half of every batch and the stage averages gradients: the single-device
    # pipeline on the whole batch, up to the order of floating-point sums (Adam amplifies it a little)
    assert max_difference(tmp_path / "dist", tmp_path / "single") < 1e-3


def test_replicas_of_a_stage_hold_the_same_part_and_flow_head_bit_for_bit(tmp_path):
    """The ActNorm trap: a replica whose ActNorms (the flow head's among them) initialised otherwise (from
    its own rows of the first batch, or through a GPU's non-deterministic kernels) would drift from the
    others for good. Here replica 1 of stage 0 (rank 2) initialises from a scaled batch, and so rank 3 from
    its output: every stage takes replica 0's weights and buffers after the initialisation, and the
    replicas average their gradients, so they end identical, to the bit."""
    config = multirank_config(tmp_path, parts=2, **{"parts.boundary_prior": "flow"})
    result = torchrun(4, config, tmp_path / "dist", env={"PIPEFLOW_TEST_FAULT": "skew:2:init"})
    ok(result)
    assert "[rank 2] injected fault: skew init" in result.stderr
    assert any(k.startswith("prior.steps.") for k in assert_replicas_equal(tmp_path / "dist"))


def test_wrong_process_count_is_one_line_and_status_2_on_every_rank(tmp_path):
    config = multirank_config(tmp_path, parts=2)
    result = torchrun(3, config, tmp_path / "dist", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("pipeflow.launch: error")]
    assert sorted(errors) == sorted(
        f"pipeflow.launch: error (rank {r}): 3 processes cannot run 2 parts: the number of processes must be a "
        "multiple of parts.count (torchrun --nproc_per_node=2, or 2 x replicas)" for r in range(3)
    )
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "dist").exists()


def test_launch_without_torchrun_checks_process_count(tmp_path):
    config = multirank_config(tmp_path, parts=2)
    result = subprocess.run([sys.executable, "-m", "pipeflow.launch", "--config", str(config), "--out",
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pipeflow.launch: error (rank 0): 1 processes cannot run 2 parts: the number of processes must be a "
        "multiple of parts.count (torchrun --nproc_per_node=2, or 2 x replicas)"]
    assert not (tmp_path / "x").exists()


def test_launch_refuses_an_unknown_argument_in_one_line(tmp_path):
    """argparse's own refusal (usage lines, then SystemExit) had ended in a traceback and status 1."""
    result = subprocess.run([sys.executable, "-m", "pipeflow.launch", "--out", str(tmp_path / "x"), "--resume",
                             "latest"], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pipeflow.launch: error (rank 0): argument --resume: invalid choice: 'latest' (choose from 'auto') "
        "(see 'python -m pipeflow.launch --help')"]
    assert not (tmp_path / "x").exists()


def test_by_parts_a_device_holds_only_its_own_part(tmp_path):
    """The placement each rank makes before the pipeline, on the meta device (it needs no GPU)."""
    cfg = load_config(multirank_config(tmp_path, parts=3))
    model = build_model(cfg, (1, 8, 8))
    parts = build_parts(cfg, model, 3)
    meta = torch.device("meta")
    place_own_part(model, parts, 1, meta)
    on = lambda part: {t.device.type for t in [*part.parameters(), *part.buffers()]}  # noqa: E731
    assert [on(p) for p in parts] == [{"cpu"}, {"meta"}, {"cpu"}]
    assert on(model) == {"cpu", "meta"}  # the model shares the part's layers: they moved with it
    place_whole_model(model, parts, meta)  # before the gather
    assert on(model) == {"meta"} and all(on(p) == {"meta"} for p in parts)
