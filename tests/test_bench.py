"""`pipeflow bench` on a tiny config: it runs every kind of run and writes a well-formed JSON.

No measured timing is asserted here (the machine may be busy): of a real bench only that every
figure is there, and the figures that do not depend on timing (bytes per step, cuts, cost shares)
are exact. Speed-ups, plans and targets are checked on made-up worker results with known step times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_glow
from support import pipeflow_in_process

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


@pytest.fixture(scope="module")
def full_bench(config, tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One `pipeflow bench` of every kind of run on the tiny config: its output and its JSON report."""
    out = tmp_path_factory.mktemp("bench-json") / "bench.json"
    result = pipeflow("bench", "--config", config, "--steps", 3, "--warmup", 2, "--scheme", "across",
                      "--only", "e2e,alternate,pipeline-1dev,ddp,pipeline,gpipe,1f1b", "--json", out, "--quiet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_bench_runs_everything_and_writes_json(full_bench):
    result, report = full_bench
    assert "Traceback" not in result.stderr
    for key in ("command", "machine", "settings", "config", "step_costs", "splits", "runs", "predictions", "targets"):
        assert key in report
    assert report["settings"]["parts"] == 2 and report["settings"]["batch"] == 16
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"e2e", "alternate across", "pipeline across 1 dev", "ddp x2", "pipeline across x2", "gpipe x2",
                         "1f1b x2"}, runs.keys()
    for r in runs.values():
        assert "error" not in r, r
        assert r["step_seconds"] > 0 and len(r["step_times"]) == 3
        assert len(r["ranks"]) == r["ranks_count"]
        for rank in r["ranks"]:
            assert rank.get("paced_seconds", 0.0) == 0.0  # no --bandwidth: nothing is held back
    assert runs["e2e"]["speedup"] == pytest.approx(1.0)

    split = report["splits"]["across"]
    assert split["cuts"] == [1]  # across: half of the first level's 2 steps
    assert sum(p["flop_share"] for p in split["parts"]) == pytest.approx(1.0)

    pipe = runs["pipeline across x2"]
    assert [x["stage"] for x in pipe["ranks"]] == [0, 1]
    # every stage waits for all after its first step (where it compiles): stage 0's second after stage 1's first
    assert pipe["ranks"][0]["updates"][1][0] > pipe["ranks"][1]["updates"][0][1]
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

    for name in ("gpipe x2", "1f1b x2"):  # end-to-end pipeline parallelism: latents forwards, their gradients back
        first, last = runs[name]["ranks"]
        assert first["forward_bytes_per_step"] == last["backward_bytes_per_step"] == 16 * (4 * 4 * 4 + 1) * 4
        assert first["backward_bytes_per_step"] == last["forward_bytes_per_step"] == 0
        assert runs[name]["warmup_seconds"] > 0 and all(x["utilisation"] > 0 for x in (first, last))

    alt = report["predictions"]["alternate"]
    assert alt["step_ratio"]["flop_model"] == pytest.approx(split["flop_model"]["alternate_step"])
    step, plan = alt["step_ratio"]["flop_model"], alt["plan_ratio"]["flop_model"]
    assert min(step, 1) < plan < max(step, 1)  # fine-tuning costs e2e's (a head larger than a part: step > 1)
    assert report["predictions"]["distributed"]["scheme"] == "across"
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"2", "balanced", "peak", "alternate"}
    assert "pipeflow bench" in result.stdout and "speed-up" in result.stdout

    from pipeflow.tools.bench import to_markdown

    md = to_markdown(report)
    assert "| e2e | 1x1 |" in md and "| pipeline across x2 | 2x1 |" in md and "| target |" in md


def test_bench_records_the_convolutions_of_what_each_process_trains(full_bench):
    """The floor of each process's convolutions: recorded from a forward pass of what it trains. e2e's are the
    FLOP model's (less its few FLOPs per element); the ranks of DDP share them out by rows, GPipe's and 1F1B's
    by parts and microbatches; a by-parts stage adds its boundary prior's (the last part's, the top prior, has
    no convolution, so that it is there cannot be seen here)."""
    _, report = full_bench
    runs = {r["name"]: r for r in report["runs"]}
    conv_flops = {name: [_recorded_flops(x) for x in r["ranks"]]
                  for name, r in runs.items() if name != "alternate across"}
    assert runs["alternate across"]["ranks"][0]["conv_floor_seconds"] is None  # no one step: no floor
    (whole,) = conv_flops["e2e"]
    assert 1.0 < 3 * 16 * sum(report["step_costs"]["flops"]) / whole < 1.1
    assert sum(conv_flops["ddp x2"]) == pytest.approx(whole) and conv_flops["ddp x2"][0] == conv_flops["ddp x2"][1]
    assert {row["input"][0] for row in runs["ddp x2"]["ranks"][0]["convolutions"]} == {8}
    assert sum(conv_flops["gpipe x2"]) == sum(conv_flops["1f1b x2"]) == pytest.approx(whole)
    micro = report["settings"]["microbatches"]
    for name in ("gpipe x2", "1f1b x2"):
        assert {row["input"][0] for x in runs[name]["ranks"] for row in x["convolutions"]} == {16 // micro}
        assert {row["count"] % micro for x in runs[name]["ranks"] for row in x["convolutions"]} == {0}
    assert conv_flops["pipeline across x2"][1] == conv_flops["gpipe x2"][1]  # the last part: the same either way
    assert conv_flops["pipeline across x2"][0] > conv_flops["gpipe x2"][0]  # part 0's flow head
    (one_device,) = conv_flops["pipeline across 1 dev"]
    assert one_device == pytest.approx(sum(conv_flops["pipeline across x2"]))  # every part, with its prior
    for name, r in runs.items():
        holders = r["ranks"] if r["kind"] in ("pipeline", "pipelined") else [r]
        assert all(x["ceiling"] > 0 for x in holders) if name != "alternate across" else r["ceiling"] is None


def test_peak_memory_grows_with_the_batch(config, full_bench):
    """The e2e run's peak above the worker's baseline (activations and their gradients) grows with the batch."""
    from pipeflow.config import load_config
    from pipeflow.tools.bench import BenchOptions, bench

    _, small = full_bench  # batch 16
    report = bench(load_config(config), BenchOptions(batch=512, steps=1, warmup=2, modes=["e2e"]))
    (large,) = report["runs"]
    assert "error" not in large, large
    peak_small = next(r for r in small["runs"] if r["name"] == "e2e")["ranks"][0]["peak_memory_bytes"]
    assert large["ranks"][0]["peak_memory_bytes"] > 2 * peak_small


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
    result = pipeflow_in_process("bench", "--config", config, *args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stdout + result.stderr


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
    from pipeflow.tools.plan import describe_parts, measured_alternate_ratio

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
    assert stage_cost_ratio(part_costs(train, cuts)) == pytest.approx(max(r.measured_share for r in rows))


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


MIB = 2**20


def _recorded_flops(rank: dict) -> float:
    """Training FLOPs of the convolutions a bench process recorded of its step."""
    from pipeflow.tools.conv_floor import ConvCall

    return sum(row["count"] * ConvCall.from_row(row).train_flops for row in rank["convolutions"])


def worker_result(step_seconds, active=None, peak=MIB, rank=0):
    """What a worker process reports for a one-device or DDP run with these step times (warm-up first)."""
    return {"rank": rank, "step_seconds": step_seconds, "active": active or [[]] * len(step_seconds),
            "skipped": 0, "params": 100, "wire_bytes_per_step": 0, "allreduce_bytes_per_step": 400,
            "memory": {"peak_bytes": peak, "peak_abs_bytes": 10 * MIB + peak, "source": "test"}}


def stage_result(rank, step, peak):
    """What a pipeline stage reports: five updates, one every ``step`` seconds."""
    return {"rank": rank, "stage": rank, "intervals": [(step * i, step * i + step / 2) for i in range(5)],
            "forward_messages": 1, "forward_bytes": 0, "backward_bytes": 0, "wire_seconds": 0.0, "params": 1,
            "skipped": 0, "memory": {"peak_bytes": peak, "peak_abs_bytes": 10 * MIB + peak, "source": "test"}}


def synthetic_report(config, pipeline_step=0.25, pipeline_peaks=(50 * MIB, 50 * MIB)) -> dict:
    """A bench report built from made-up worker results (batch 16, 2 ranks, 6 + 3 epochs) and derived.

    e2e steps take 0.5 s, DDP 0.3 s (its slowest rank's), alternate 0.2 s for part 1 and 0.4 s for
    part 2, the pipeline ``pipeline_step``; e2e peaks at 100 MiB.
    """
    from pipeflow.config import load_config, with_overrides
    from pipeflow.tools.bench import (BenchOptions, _ddp_metrics, _derive, _Session, _single_metrics,
                                      _stage_metrics)

    cfg = with_overrides(load_config(config), ["train.by_parts_epochs=6", "train.finetune_epochs=3"])
    report = {"settings": {"threads_per_rank": 1, "warmup": 2, "batch": 16}, "runs": [], "notes": [],
              "step_costs": {"flops": [1e9, 1e9]},
              "splits": {"across": {"cuts": [1], "same_as": None, "parts": [],
                                    "flop_model": {"alternate_step": 0.6, "pipeline_step": 0.55}}}}
    session = _Session(BenchOptions(), 2, 16, {}, Path("unused"), report, log=lambda message: None)
    common = {"scheme": None, "cuts": [], "ranks_count": 1, "threads_per_rank": 1, "bandwidth": None}
    e2e = worker_result([9.0, 9.0, 0.5, 0.4, 0.6], peak=100 * MIB)
    session.record("e2e", "single", _single_metrics(e2e, 2, 1, "e2e"), schedule="e2e", **common)
    alternate = worker_result([9.0, 9.0, 0.2, 0.4, 0.2, 0.4], active=[[0], [1], [0], [1], [0], [1]])
    session.record("alternate across", "single", _single_metrics(alternate, 2, 2, "alternate"),
                   **{**common, "schedule": "alternate", "scheme": "across", "cuts": [1]})
    ddp = [worker_result([9.0, 9.0, 0.3, 0.2, 0.3], rank=0), worker_result([9.0, 9.0, 0.2, 0.3, 0.2], rank=1)]
    session.record("ddp x2", "ddp", _ddp_metrics(ddp, 2), **{**common, "schedule": "e2e", "ranks_count": 2,
                                                               "bandwidth": 0.0})
    stages = [stage_result(rank, pipeline_step, peak) for rank, peak in enumerate(pipeline_peaks)]
    session.record("pipeline across x2", "pipeline", _stage_metrics(stages, 1, 3),
                   **{**common, "schedule": "pipeline", "scheme": "across", "cuts": [1], "ranks_count": 2,
                      "bandwidth": 0.0})
    _derive(report, cfg, (1, 8, 8), 2)
    return report


def test_speedups_and_plans_from_known_step_times(config):
    report = synthetic_report(config)
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["e2e"]["images_per_s"] == pytest.approx(16 / 0.5)  # the median step after warm-up
    assert runs["e2e"]["speedup"] == pytest.approx(1.0)
    assert runs["ddp x2"]["speedup"] == pytest.approx(0.5 / 0.3)  # every step waits for the slower rank
    assert runs["alternate across"]["step_ratio"] == pytest.approx(0.3 / 0.5)  # the mean of the parts' steps
    assert runs["pipeline across x2"]["speedup"] == pytest.approx(2.0)
    pred = report["predictions"]
    # 6 alternate epochs at 0.6 of an e2e epoch, then 3 e2e epochs, against 9 e2e epochs
    assert pred["alternate"]["plan_ratio"]["measured"] == pytest.approx((6 * 0.6 + 3) / 9)
    assert pred["alternate"]["plan_ratio"]["flop_model"] == pytest.approx((6 * 0.6 + 3) / 9)
    # 6 pipeline epochs (0.25 s a step) + 3 DDP epochs (0.3 s) against 9 DDP epochs, and against 9 e2e epochs
    assert pred["distributed"]["plan_ratio_vs_ddp"] == pytest.approx((6 * 0.25 + 3 * 0.3) / (9 * 0.3))
    vs_one_device = pred["distributed"]["plan_ratio_vs_one_device"]["measured"]
    assert vs_one_device == pytest.approx((6 * 0.25 + 3 * 0.3) / (9 * 0.5))


def met(report: dict, target_start: str) -> bool:
    (target,) = [t for t in report["targets"] if t["target"].startswith(target_start)]
    return target["met"]


@pytest.mark.parametrize("speedup, expected", [(1.85, True), (1.75, False)])
def test_the_speedup_target_flips_at_its_threshold(config, speedup, expected):
    report = synthetic_report(config, pipeline_step=0.5 / speedup)
    assert met(report, "2 ranks x 1 thread >= 1.8x") is expected


@pytest.mark.parametrize("pipeline_step, expected", [(0.29, True), (0.31, False)])
def test_the_pipeline_against_ddp_target_flips_when_ddp_is_faster(config, pipeline_step, expected):
    report = synthetic_report(config, pipeline_step=pipeline_step)  # DDP: 0.3 s a step
    assert met(report, "balanced pipeline >= DDP") is expected


@pytest.mark.parametrize("peaks, expected", [((50 * MIB, 54 * MIB), True), ((40 * MIB, 56 * MIB), False)])
def test_the_memory_target_takes_the_largest_rank_against_e2e(config, peaks, expected):
    report = synthetic_report(config, pipeline_peaks=peaks)  # e2e: 100 MiB; the bound 1.1 x 100 / 2 = 55 MiB
    assert met(report, "peak memory per rank") is expected


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


@pytest.mark.parametrize("name", ["standard", "position", "conditional", "flow"])
def test_flop_model_counts_a_boundary_prior_as_torch_does(name):
    """A part's FLOPs include its boundary prior's (the flow head's steps, the conditional prior's
    convolution), which training by parts runs; fine-tuning's count leaves them out."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeflow.parts import split_into_parts
    from pipeflow.tools.flops import part_flops, prior_flops

    model = make_glow(levels=2, steps=2, hidden=8)
    first, last = split_into_parts(model, "across", 2, boundary_prior=name)
    h = torch.rand(32, *first.out_shape, dtype=torch.float64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        first.prior.double().log_prob(h)
    counted, ours = counter.get_total_flops() / 32, prior_flops(first.prior, first.out_shape)
    assert ours == counted == 0 if name in ("standard", "position") else 0.98 <= ours / counted <= 1.1
    with_priors, without = part_flops(model, [first, last]), part_flops(model, [first, last], with_priors=False)
    assert with_priors == [without[0] + ours, without[1]]  # the last part's prior is the model's top prior


def test_alternate_cost_ratio_by_hand():
    from pipeflow.tools.flops import alternate_cost_ratio

    # 2 parts of forward cost 1 and 3: training part 1 costs 3*1; training part 2 costs 1 (part 1
    # under no_grad) + 3*3; an e2e step 3*4. Mean (3 + 10) / 2 / 12 = 13/24.
    assert alternate_cost_ratio([1.0, 3.0]) == pytest.approx(13 / 24)
    assert alternate_cost_ratio([2.0]) == 1.0
    # part 1 with a boundary prior of cost 0.5: its own step runs it (3*1.5), the step of part 2 runs
    # part 1 without it (1 + 3*3), and end to end never runs it (3*4): (4.5 + 10) / 2 / 12
    assert alternate_cost_ratio([1.5, 3.0], [1.0, 3.0]) == pytest.approx(14.5 / 24)


@pytest.mark.parametrize("compiled_step, expected_met", [(0.35, True), (0.37, False)])
def test_compiled_row_reports_its_compilation_speedup_and_utilisation(config, compiled_step, expected_met):
    """e2e steps of 0.5 s after 2 warm-up steps of 9 s; the compiled run's first warm-up step takes 60 s.

    A step trains 3 x 2 GFLOP x 16 images = 96 GFLOP; on a convolution rate of 384 GFLOP/s the
    eager step's 192 GFLOP/s are 50 %.
    """
    from pipeflow.config import load_config
    from pipeflow.tools.bench import BenchOptions, _derive, _Session, _single_metrics

    report = {"settings": {"threads_per_rank": 1, "warmup": 2, "batch": 16}, "runs": [], "notes": [], "splits": {},
              "step_costs": {"flops": [1e9, 1e9]}}
    session = _Session(BenchOptions(), 2, 16, {}, Path("unused"), report, log=lambda message: None)
    common = {"schedule": "e2e", "scheme": None, "cuts": [], "ranks_count": 1, "threads_per_rank": 1,
              "bandwidth": None}
    for name, steps in (("e2e", [9.0, 9.0, 0.5, 0.4, 0.6]), ("e2e compiled", [60.0, 9.0] + [compiled_step] * 3)):
        result = {**worker_result(steps), "conv_flops_per_s": 384e9, "conv_floor": {"seconds": 0.125}}
        session.record(name, "single", _single_metrics(result, 2, 1, "e2e"), compiled=name != "e2e", **common)
    _derive(report, load_config(config), (1, 8, 8), 2)
    eager, compiled = report["runs"]
    assert eager["utilisation"] == pytest.approx(0.5)
    assert compiled["utilisation"] == pytest.approx(96e9 / compiled_step / 384e9)
    assert eager["ceiling"] == compiled["ceiling"] == pytest.approx(96e9 / 0.125 / 384e9)  # 2: its convolutions' floor
    # 69 s of warm-up where two steps take 2 x compiled_step, less the eager warm-up's 17 s beyond its steps
    assert compiled["compile_seconds"] == pytest.approx(69 - 2 * compiled_step - 17)
    assert compiled["amortised_after_steps"] == pytest.approx(compiled["compile_seconds"] / (0.5 - compiled_step))
    assert met(report, "e2e step compiled >= 1.4x") is expected_met
    util = {t["run"]: t["met"] for t in report["targets"] if t["target"].startswith("utilisation")}
    assert util == {"e2e": True, "e2e compiled": True}  # 50 % and above
