"""`pipeflow bench` on a tiny config: it runs every kind of run and writes a well-formed JSON.

No timing is asserted here (the machine may be busy): only that every figure is there, and
the figures that do not depend on timing (bytes per step, cuts, cost shares) are exact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_glow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}

TINY = """
[model]
levels = 2
steps = 2
hidden = 8
[data]
dataset = "digits"
[parts]
count = 2
scheme = "across"
[train]
batch_size = 16
lr = 1e-3
warmup_steps = 2
by_parts_epochs = 6
finetune_epochs = 3
[distributed]
timeout_s = 60
"""


def pipeflow(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeflow.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.toml"
    path.write_text(TINY)
    return path


def test_bench_runs_everything_and_writes_json(config, tmp_path):
    out = tmp_path / "bench.json"
    result = pipeflow("bench", "--config", config, "--steps", 3, "--warmup", 2, "--scheme", "across",
                      "--only", "e2e,alternate,ddp,pipeline", "--json", out, "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    report = json.loads(out.read_text())
    for key in ("command", "machine", "settings", "config", "step_costs", "splits", "runs", "predictions", "targets"):
        assert key in report
    assert report["settings"]["parts"] == 2 and report["settings"]["batch"] == 16
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"e2e", "alternate across", "ddp x2", "pipeline across x2"}, runs.keys()
    for r in runs.values():
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["step_seconds"] > 0 and len(r["step_times"]) >= 1
        assert math.isclose(r["images_per_s"], 16 / r["step_seconds"])
        assert r["speedup"] > 0 and r["step_ratio"] > 0
        assert len(r["ranks"]) == r["ranks_count"]
        for rank in r["ranks"]:
            assert rank["peak_memory_bytes"] >= 0 and rank["peak_memory_abs_bytes"] > 0
            assert rank.get("paced_seconds", 0.0) == 0.0  # no --bandwidth: nothing is held back
    assert runs["e2e"]["speedup"] == pytest.approx(1.0)

    split = report["splits"]["across"]
    assert split["cuts"] == [1]  # across: half of the first level's 2 steps
    assert sum(p["flop_share"] for p in split["parts"]) == pytest.approx(1.0)

    pipe = runs["pipeline across x2"]
    assert [x["stage"] for x in pipe["ranks"]] == [0, 1]
    for x in pipe["ranks"]:
        assert 0 < x["busy_fraction"] <= 1.0 + 1e-6 and x["idle_seconds_per_step"] >= -1e-6
    # forward: one latent of part 0's output shape (4x4x4) plus the carry per image, and a header; nothing backwards
    assert pipe["ranks"][0]["forward_bytes_per_step"] == 32 + 16 * (4 * 4 * 4 + 1) * 4
    assert pipe["forward_bytes_per_step"] == pipe["forward_bytes_per_rank_per_step"]
    assert pipe["forward_bytes_per_step"] == pipe["ranks"][0]["forward_bytes_per_step"]
    assert pipe["backward_bytes_per_step"] == 0
    assert pipe["flop_model_step_ratio"] == pytest.approx(max(p["flop_share"] for p in split["parts"]))

    ddp = runs["ddp x2"]
    assert ddp["allreduce_bytes_per_step"] == 4 * ddp["params"]  # every gradient, every step
    assert ddp["backward_bytes_per_rank_per_step"] == pytest.approx(ddp["allreduce_bytes_per_step"])  # ring, 2 ranks
    assert ddp["backward_bytes_per_step"] == pytest.approx(2 * ddp["allreduce_bytes_per_step"])
    assert ddp["flop_model_step_ratio"] == 0.5

    alt = report["predictions"]["alternate"]
    assert alt["step_ratio"]["flop_model"] == pytest.approx(split["flop_model"]["alternate_step"])
    assert alt["plan_ratio"]["flop_model"] == pytest.approx((6 * alt["step_ratio"]["flop_model"] + 3) / 9)
    assert report["predictions"]["distributed"]["plan_ratio_vs_ddp"] > 0
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"2", "balanced", "peak", "alternate"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    assert "pipeflow bench" in result.stdout and "speed-up" in result.stdout

    from pipeflow.tools.bench import to_markdown

    md = to_markdown(report)
    assert "| e2e | 1x1 |" in md and "| pipeline across x2 | 2x1 |" in md and "| target |" in md


def test_a_paced_link_carries_one_thing_at_a_time_and_banks_no_idle_time():
    from pipeflow.distributed.transport import LinkPacer

    link = LinkPacer(100.0)  # bytes/s
    assert link.occupy(50, now=0.0) == 0.5
    assert link.occupy(50, now=0.1) == 1.0  # queued behind the first
    assert link.occupy(100, now=5.0) == 6.0  # after an idle link: 1 s of its own, no burst from credit
    assert link.occupy(0, now=5.5) == 6.0


def test_bench_bandwidth_throttles_both_ddp_and_the_pipeline(config, tmp_path):
    """Both kinds of run go through the paced link (``LinkPacer``, tested above): at 40 kB/s it must
    hold their traffic back (a tiny model's step computes in milliseconds, its transfers take a
    tenth of a second and more), and the unthrottled runs of the test above are never held."""
    bandwidth = 40_000.0  # bytes/s per rank
    out = tmp_path / "bench.json"
    result = pipeflow("bench", "--config", config, "--steps", 3, "--warmup", 2, "--scheme", "across",
                      "--only", "ddp,pipeline", "--bandwidth", bandwidth, "--json", out, "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"ddp x2 @40 kB/s", "pipeline across x2 @40 kB/s"}, runs.keys()
    ddp, pipe = runs["ddp x2 @40 kB/s"], runs["pipeline across x2 @40 kB/s"]
    assert ddp["bandwidth"] == pipe["bandwidth"] == bandwidth
    assert ddp["backward_bytes_per_rank_per_step"] == pytest.approx(4 * ddp["params"])  # 2 ranks: every gradient
    assert pipe["forward_bytes_per_rank_per_step"] == 32 + 16 * (4 * 4 * 4 + 1) * 4
    assert all(rank["paced_seconds"] > 0 for rank in ddp["ranks"])
    assert pipe["ranks"][0]["paced_seconds"] > 0
    assert pipe["ranks"][1]["paced_seconds"] == 0  # the last rank sends nothing


@pytest.mark.parametrize("args, message", [
    (("--parts", "1"), "--parts"),
    (("--scheme", "sideways"), "unknown --scheme"),
    (("--only", "e2e,fast"), "unknown --only"),
    (("--batch", "15"), "multiple of --parts"),
])
def test_bench_bad_input_is_one_line(config, args, message):
    result = pipeflow("bench", "--config", config, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_step_groups_are_exactly_the_layers_of_the_parts():
    from pipeflow.tools.flops import step_flops, step_layer_groups
    from pipeflow.parts import split_into_parts

    model = make_glow(levels=3, steps=3)
    groups = step_layer_groups(model)
    assert len(groups) == model.num_steps == len(step_flops(model))
    assert sorted(i for g in groups for i in g) == list(range(len(model.layers)))
    for cut in range(1, model.num_steps):
        first, _ = split_into_parts(model, "cuts", 2, [cut])
        assert {id(m) for m in first.layers} == {id(model.layers[i]) for g in groups[:cut] for i in g}


def test_measured_costs_balance_and_predict():
    from pipeflow.tools.balance import balanced_cuts, measure_step_costs, part_costs
    from pipeflow.tools.flops import alternate_cost_ratio, stage_cost_ratio
    from pipeflow.tools.plan import describe_parts, measured_alternate_ratio, pipeline_ratios

    torch.manual_seed(0)
    model = make_glow(levels=2, steps=2).float()
    x = torch.rand(8, 1, 8, 8) - 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, forward = measure_step_costs(model, x, repeats=2)
    assert len(train) == len(forward) == model.num_steps
    assert all(t > 0 for t in train) and all(f > 0 for f in forward)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # learning rate 0: unchanged

    cuts = balanced_cuts(train, 2)
    best = min(max(part_costs(train, [c])) for c in range(1, model.num_steps))
    assert max(part_costs(train, cuts)) == pytest.approx(best)
    # with forward = train / 3 the measured model is the FLOP model's formula
    costs = [1.0, 2.0, 3.0, 4.0]
    assert measured_alternate_ratio([3 * c for c in costs], costs, [2]) == pytest.approx(
        alternate_cost_ratio(part_costs(costs, [2])))
    assert stage_cost_ratio([1.0, 3.0]) == 0.75

    from pipeflow.parts import split_into_parts

    parts = split_into_parts(model, "cuts", 2, cuts)
    rows = describe_parts(model, parts, train)
    assert sum(r.measured_share for r in rows) == pytest.approx(1.0)
    assert pipeline_ratios(model, parts, train)["pipeline_step_measured"] == pytest.approx(
        max(r.measured_share for r in rows))


def test_stage_metrics_from_intervals():
    from pipeflow.tools.bench import _stage_metrics

    def rank(r, intervals):
        return {"rank": r, "stage": r, "intervals": intervals, "forward_messages": 5, "forward_bytes": 32 + 4 * 100,
                "backward_bytes": 0, "wire_seconds": 0.0, "params": 1, "skipped": 0,
                "memory": {"peak_bytes": 1, "peak_abs_bytes": 2, "source": "test"}}

    # steps every second; stage 0 busy 0.25 s of each, stage 1 busy 0.5 s
    r0 = rank(0, [(i, i + 0.25) for i in range(4)])
    r1 = rank(1, [(i + 0.3, i + 0.8) for i in range(4)])
    m = _stage_metrics([r0, r1], warmup=1, steps=3)
    assert m["step_seconds"] == pytest.approx(1.0)
    assert m["ranks"][1]["updates"][0] == pytest.approx((0.3, 0.8))
    assert [x["busy_fraction"] for x in m["ranks"]] == pytest.approx([0.25, 0.5])
    assert [x["idle_seconds_per_step"] for x in m["ranks"]] == pytest.approx([0.75, 0.5])
    assert m["ranks"][0]["forward_bytes_per_step"] == 100


def test_pipeline_goes_as_fast_as_its_slowest_stage():
    from pipeflow.tools.bench import _stage_metrics

    def rank(r, intervals):
        return {"rank": r, "stage": r, "intervals": intervals, "forward_messages": 1, "forward_bytes": 0,
                "backward_bytes": 0, "wire_seconds": 0.0, "params": 1, "skipped": 0,
                "memory": {"peak_bytes": 1, "peak_abs_bytes": 2, "source": "test"}}

    # stage 0 takes 2 s a step; the last stage drains two queued messages fast, then waits on stage 0
    r0 = rank(0, [(2 * i, 2 * i + 2) for i in range(5)])
    r1 = rank(1, [(2.1, 2.5), (2.5, 2.9), (2.9, 3.3), (6.1, 6.5), (8.1, 8.5)])
    m = _stage_metrics([r0, r1], warmup=1, steps=3)
    assert m["step_seconds"] == pytest.approx(2.0) and m["slowest_rank"] == 0


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_flop_model_counts_what_torch_counts(coupling):
    """Each flow step's and split's FLOPs per image against torch's own counter of its
    convolutions and products over a batch of 32 (torch leaves out element-wise work, the
    model's few per element on top; the model leaves out the LU weight's P L U products,
    once per batch, not per image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeflow.tools.flops import layer_flops
    from pipeflow.glow import FlowStep, Glow, Split

    model = Glow(3, 16, levels=2, steps=2, hidden=32, coupling=coupling)
    model.initialize(torch.rand(4, 3, 16, 16) - 0.5)
    batch = 32
    h = torch.rand(batch, 3, 16, 16) - 0.5
    checked = 0
    with torch.no_grad():
        for layer, (shape_in, _) in zip(model.layers, model.layer_shapes):
            assert tuple(h.shape[1:]) == shape_in
            if isinstance(layer, (FlowStep, Split)):
                with FlopCounterMode(display=False) as counter:
                    out = layer(h)
                ours = layer_flops(layer, shape_in)
                counted = counter.get_total_flops() / batch
                assert 0.98 <= ours / counted <= 1.1, (type(layer).__name__, shape_in, ours / counted)
                checked += 1
                h = out[0]
            else:
                h = layer(h)[0]
    assert checked == 4 + 1


def test_alternate_cost_ratio_by_hand():
    from pipeflow.tools.flops import alternate_cost_ratio

    # 2 parts of forward cost 1 and 3: training part 1 costs 3*1; training part 2 costs 1 (part 1
    # under no_grad) + 3*3; an e2e step 3*4. Mean (3 + 10) / 2 / 12 = 13/24.
    assert alternate_cost_ratio([1.0, 3.0]) == pytest.approx(13 / 24)
    assert alternate_cost_ratio([2.0]) == 1.0
