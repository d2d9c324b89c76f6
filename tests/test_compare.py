"""`pipeflow compare`: every run trained, then a complete report, JSON, plots and sample grids.

Through the library function and through the command line, on a tiny digits config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeflow.tools.compare as compare_module
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.part_trainer import TrainingDiverged
from pipeflow.checkpoint import CheckpointStore
from pipeflow.config import from_dict, load_config, with_overrides
from pipeflow.tools.compare import DEFAULT_RUNS, compare, parse_runs, run_config
from pipeflow.errors import UserError
from support import pipeflow_in_process

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", "PYTHONPATH": str(ROOT)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = {
    "model": {"levels": 2, "steps": 2, "hidden": 8},
    "data": {"dataset": "digits", "train_limit": 128, "test_limit": 32},
    "parts": {"count": 2, "scheme": "across"},
    "train": {"by_parts_epochs": 2, "finetune_epochs": 1, "batch_size": 16, "eval_batch_size": 64,
              "steps_per_epoch": 2, "lr": 1e-3, "warmup_steps": 2, "alternate_every": 1, "samples": 4,
              "threads": 1, "log_every": 1},
}
TINY_TOML = "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
                      for section, keys in TINY.items())


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 100 and data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82")


def check_outputs(out: Path, results: dict, names=DEFAULT_RUNS) -> None:
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["complete"] is True
    assert list(on_disk["runs"]) == list(names)
    for name in names:
        run = on_disk["runs"][name]
        for key in ("test_bpd", "train_seconds", "time_ratio", "bpd_diff", "cpu_seconds", "cpu_ratio"):
            assert isinstance(run[key], float), (name, key, run[key])
        assert run["history"] and run["history"][-1]["epoch"] == 3
        assert run["test_bpd"] == results["runs"][name]["test_bpd"]
        if name == "e2e":
            assert run["time_ratio"] == 1.0 and run["bpd_diff"] == 0.0 and run["by_parts_test_bpd"] is None
        else:
            assert isinstance(run["by_parts_test_bpd"], float)
            step, plan = run["predicted"]["step"], run["predicted"]["plan"]
            assert 0 < step and min(step, 1) <= plan <= max(step, 1)  # fine-tuning costs e2e's
        assert is_png(out / run["sample"]), name
    assert on_disk["plots"] == ["plots/bpd_vs_time.png", "plots/bpd_vs_cpu.png", "plots/bpd_vs_epoch.png"]
    for plot in on_disk["plots"]:
        assert is_png(out / plot)

    report = (out / "report.md").read_text()
    claim = "by-parts + fine-tuning reaches the end-to-end test bpd within 0.02 in at most 75% of the wall-clock"
    assert claim in report
    assert "claim held for" in report
    assert "## The by-parts phase alone" in report and "## The sequential ablation" in report
    assert "predicted step" in report and "Load average" in report and "## At equal training time" in report
    assert all(isinstance(r["cpu_seconds"], float) for run in on_disk["runs"].values() for r in run["history"])
    for name in names:
        assert f"| {name} |" in report
        assert f"![{name}](samples/{name}.png)" in report
    for plot in on_disk["plots"]:
        assert f"]({plot})" in report


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    messages = []
    results = compare(from_dict(TINY), tmp / "report", work_dir=tmp / "runs", log=messages.append)
    return tmp, results, messages


def test_library_compare_writes_a_complete_report(library_run):
    tmp, results, messages = library_run
    out = tmp / "report"
    check_outputs(out, results)
    # the heavy files stay in the work dir; the report dir holds only the report assets
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.jsonl"))
    assert (tmp / "runs" / "alternate2" / "model.pt").is_file()
    assert any("alternate2: training" in m for m in messages)


def test_runs_share_the_budget_and_differ_as_asked(library_run):
    tmp, results, _ = library_run
    runs = results["runs"]
    steps = {n: r["steps"] for n, r in runs.items()}
    assert len(set(steps.values())) == 1  # same epochs x steps per epoch for every run
    phases = {n: [h["phase"] for h in r["history"]] for n, r in runs.items()}
    assert phases["e2e"] == ["e2e"] * 3
    assert phases["alternate2"] == ["by_parts", "by_parts", "finetune"]
    assert runs["alternate3"]["cuts"] == [1, 3] and runs["alternate2"]["cuts"] == [1]
    config = (tmp / "runs" / "sequential2" / "config.toml").read_text()
    assert 'schedule = "sequential"' in config and "count = 2" in config


def test_rerun_reuses_finished_runs_and_resumes_an_interrupted_one(library_run, tmp_path):
    tmp, first, _ = library_run
    # pretend alternate3 was killed in its last epoch: no summary.json, nor that epoch's checkpoint
    (tmp / "runs" / "alternate3" / "summary.json").unlink()
    CheckpointStore(tmp / "runs" / "alternate3", rank=0, keep=3).discard_after(4)
    messages = []
    again = compare(from_dict(TINY), tmp / "report", work_dir=tmp / "runs", log=messages.append)
    assert again["runs"]["e2e"]["reused"] and again["runs"]["pipeline2"]["reused"]
    assert not again["runs"]["alternate3"]["reused"]
    assert any("alternate3: resuming" in m for m in messages)
    assert json.loads((tmp / "runs" / "alternate3" / "summary.json").read_text())["resumed_from_step"] == 4
    # deterministic: the resumed run gives the same bits/dim
    assert again["runs"]["alternate3"]["test_bpd"] == pytest.approx(first["runs"]["alternate3"]["test_bpd"], abs=1e-6)
    # its CPU seconds line up with its evaluations: those restored from the checkpoint lead its history
    cpu = [r["cpu_seconds"] for r in again["runs"]["alternate3"]["history"]]
    assert len(cpu) == 3 and all(isinstance(c, float) for c in cpu) and cpu == sorted(cpu)
    assert again["runs"]["e2e"]["train_seconds"] == first["runs"]["e2e"]["train_seconds"]


@pytest.mark.parametrize("error", [TrainingDiverged("part 0: 3 non-finite losses in a row"),
                                   SingularWeightError("the 1x1 convolution of step 2 is singular")])
def test_a_run_that_fails_is_recorded_and_the_others_still_compared(monkeypatch, tmp_path, error):
    def fail(*args):
        raise error

    monkeypatch.setattr(compare_module, "_train_one", fail)
    entry = compare_module._run_entry("alternate2", "alternate", 2, run_config(from_dict(TINY), "alternate", 2),
                                      tmp_path / "alternate2", False, lambda message: None)
    assert entry["test_bpd"] is None and entry["error"] == str(error)


def test_a_run_written_before_a_key_existed_is_still_reused(library_run):
    """Runs are matched as configs, not as text: a key added to pipeflow since (here train.lr_schedule,
    taking its default) does not make an older finished run another run."""
    tmp, first, _ = library_run
    config = tmp / "runs" / "e2e" / "config.toml"
    older = [line for line in config.read_text().splitlines() if not line.startswith("lr_schedule")]
    assert len(older) == len(config.read_text().splitlines()) - 1
    config.write_text("\n".join(older) + "\n")
    again = compare(from_dict(TINY), tmp / "report-again", runs="e2e", work_dir=tmp / "runs")
    assert again["runs"]["e2e"]["reused"]
    assert again["runs"]["e2e"]["train_seconds"] == first["runs"]["e2e"]["train_seconds"]


def test_a_finished_run_with_another_config_is_not_overwritten(library_run):
    tmp, _, _ = library_run
    other = from_dict({**TINY, "train": {**TINY["train"], "lr": 2e-3}})
    with pytest.raises(UserError, match="another config"):
        compare(other, tmp / "other-report", runs="e2e", work_dir=tmp / "runs")


def test_without_matplotlib_plots_are_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    messages = []
    results = compare(from_dict(TINY), tmp_path, runs="alternate2", log=messages.append)
    assert list(results["runs"]) == ["e2e", "alternate2"]  # the baseline is always there
    assert results["plots"] == [] and not (tmp_path / "plots").exists()
    assert any("pipeflow[plots]" in m for m in messages)
    assert "pipeflow[plots]" in (tmp_path / "report.md").read_text()
    # without --work-dir the runs live inside the report directory
    assert (tmp_path / "alternate2" / "summary.json").is_file()


def history(*points):
    """Eval records ``(train_seconds, test_bpd)``, one per epoch, all end to end."""
    return [{"epoch": i + 1, "phase": "e2e", "train_seconds": t, "cpu_seconds": 2 * t, "test_bpd": bpd}
            for i, (t, bpd) in enumerate(points)]


def finished(runs: dict) -> dict:
    """Results of made-up runs ``{name: (final test bpd, train seconds)}`` against an e2e of 4.0 bpd in 100 s."""
    from pipeflow.tools.compare import _finish

    def entry(name, bpd, seconds):
        return {"name": name, "schedule": name.rstrip("0123456789"), "parts": 2, "test_bpd": bpd,
                "train_seconds": seconds, "cpu_seconds": 2 * seconds,
                "history": history((seconds / 2, bpd + 0.5), (seconds, bpd))}

    results = {"claim": {}, "runs": {"e2e": {**entry("e2e", 4.0, 100.0), "parts": 1,
                                             "history": history((50.0, 4.2), (100.0, 4.0))}}}
    results["runs"].update({name: entry(name, *figures) for name, figures in runs.items()})
    _finish(results)
    return results


@pytest.mark.parametrize("bpd, seconds, held", [
    (4.019, 74.0, True),  # within 0.02 bits/dim, in less than 75% of the time
    (4.021, 74.0, False),  # just outside the bpd tolerance
    (4.019, 76.0, False),  # just over the time budget
    (3.9, 74.0, True),  # better than e2e
])
def test_the_claim_flips_at_its_thresholds(bpd, seconds, held):
    run = finished({"alternate2": (bpd, seconds)})["runs"]["alternate2"]
    assert run["claim_held"] is held
    assert run["claim_held_cpu"] is held  # CPU time in the same proportion as the wall-clock here


def test_the_paper_verdict_counts_only_the_alternate_runs():
    results = finished({"alternate2": (4.01, 70.0), "alternate3": (4.05, 60.0), "pipeline2": (4.0, 70.0)})
    claim = results["claim"]
    assert claim["per_run"] == {"alternate2": True, "alternate3": False, "pipeline2": True}
    assert claim["alternate"] == {"alternate2": True, "alternate3": False}
    assert claim["held"] is False and claim["held_any"] is True
    assert finished({"alternate2": (4.01, 70.0), "pipeline2": (4.5, 70.0)})["claim"]["held"] is True


def test_a_run_is_set_against_the_e2e_curve_at_the_same_training_time():
    run = finished({"alternate2": (4.01, 70.0)})["runs"]["alternate2"]
    # e2e: 4.2 at 50 s, 4.0 at 100 s, so 4.12 at 70 s (linear between evaluations)
    assert run["e2e_bpd_at_same_time"] == pytest.approx(4.12)
    assert run["e2e_bpd_at_same_cpu"] == pytest.approx(4.12)
    # it first came within 0.02 of the e2e final bpd at its last evaluation, 70 s: 70% of e2e's time
    assert run["seconds_to_target"] == 70.0 and run["fraction_to_target"] == pytest.approx(0.7)
    early = finished({"alternate2": (4.01, 30.0)})["runs"]["alternate2"]
    assert early["e2e_bpd_at_same_time"] is None  # it ended before e2e's first evaluation


def test_parse_runs():
    assert parse_runs("alternate2, pipeline3") == [("e2e", "e2e", 1), ("alternate2", "alternate", 2),
                                                   ("pipeline3", "pipeline", 3)]
    assert [n for n, _, _ in parse_runs(None)] == list(DEFAULT_RUNS)
    for bad in ("alternate", "alternate1", "foo2", "e2e,e2e", ""):
        with pytest.raises(UserError):
            parse_runs(bad)
    cfg = run_config(from_dict(TINY), "sequential", 2)
    assert cfg.train.schedule == "sequential" and cfg.parts.count == 2


def test_an_option_of_training_by_parts_stays_with_the_by_parts_runs():
    """``--set train.feed_ema=0.99`` (or ``train.find_lr_steps``) asks for it by parts; e2e and DDP have no parts
    to feed (or find rates for), and had refused the whole comparison ('train.feed_ema applies to ...')."""
    from pipeflow.tools.compare_ranks import parse_rank_runs, rank_run_config

    fed = with_overrides(from_dict(TINY), ["train.schedule=pipeline", "train.feed_ema=0.99", "train.find_lr_steps=5"])
    assert run_config(fed, "e2e", 1).train.feed_ema == 0 and run_config(fed, "alternate", 2).train.feed_ema == 0.99
    runs = {run.name: run for run in parse_rank_runs("e2e,ddp2,pipeline2-ddp", 2)}
    assert {name: rank_run_config(fed, run, 0, 1, 2).train.feed_ema for name, run in runs.items()} == {
        "e2e": 0, "ddp2": 0, "pipeline2-ddp": 0.99}
    assert {name: rank_run_config(fed, run, 0, 1, 2).train.find_lr_steps for name, run in runs.items()} == {
        "e2e": 0, "ddp2": 0, "pipeline2-ddp": 5}


def test_cli_compare(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    assert load_config(config) == from_dict(TINY)
    out = tmp_path / "report"
    args = ["compare", "--config", config, "--out", out, "--work-dir", tmp_path / "runs", "--set", "train.seed=1"]
    result = subprocess.run([sys.executable, "-m", "pipeflow.cli", *map(str, args)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "claim" in result.stdout and "report.md" in result.stdout
    results = json.loads((out / "compare.json").read_text())
    check_outputs(out, results)
    assert results["config"]["train"]["seed"] == 1
    assert results["command"].startswith("pipeflow compare --config")
    assert "pipeflow compare --config" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--runs", "bogus2"], "unknown run 'bogus2'"),
    (["--set", "train.by_parts_epochs=1", "--runs", "sequential3"], "sequential"),
    (["--ranks", "1"], "at least 2"),
    (["--seeds", "0,1"], "go with --ranks"),
    (["--ranks", "2", "--runs", "e2e,ddp3"], "unknown run 'ddp3'"),
    (["--ranks", "2", "--seeds", "0,x"], "--seeds expects"),
    (["--ranks", "2", "--bandwidth", "-1"], "--bandwidth"),
])
def test_cli_compare_bad_input_is_one_line(tmp_path, args, message):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    result = pipeflow_in_process("compare", "--config", config, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "e2e").exists()  # nothing trained before the error


# --- pipeflow compare --ranks P: real processes ------------------------------------------------------

RANKS_TINY = {**TINY, "data": {"dataset": "digits", "train_limit": 96, "test_limit": 32},
              "train": {**TINY["train"], "by_parts_epochs": 1, "finetune_epochs": 1, "steps_per_epoch": 3,
                        "samples": 0, "eval_ema": 0.9},
              "distributed": {"timeout_s": 60}}
RANKS_RUNS = "e2e,ddp2,pipeline2-ddp"


def compare_ranks_cli(tmp: Path, *extra) -> subprocess.CompletedProcess:
    config = tmp / "ranks.toml"
    config.write_text("\n".join(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
                                for section, keys in RANKS_TINY.items()))
    args = ["compare", "--ranks", "2", "--runs", RANKS_RUNS, "--config", config, "--out", tmp / "report",
            "--work-dir", tmp / "runs", *extra]
    return subprocess.run([sys.executable, "-m", "pipeflow.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare_ranks")
    result = compare_ranks_cli(tmp)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return tmp, result, json.loads((tmp / "report" / "compare.json").read_text())


def test_compare_ranks_trains_the_three_kinds_as_processes(ranks_run):
    tmp, result, results = ranks_run
    assert results["complete"] is True and results["ranks"] == 2
    assert list(results["runs"]) == ["e2e", "ddp2", "pipeline2-ddp"] == results["order"]
    kinds = {k: (e["kind"], e["ranks"]) for k, e in results["runs"].items()}
    assert kinds == {"e2e": ("e2e", 1), "ddp2": ("ddp", 2), "pipeline2-ddp": ("pipeline", 2)}
    for key, e in results["runs"].items():
        assert e["returncode"] == 0 and e["start"] == "fresh"
        assert e["cpu_seconds"] > 0 and e["process_wall_seconds"] > e["train_seconds"] > 0
        assert [r["images"] for r in e["history"]] == [48, 96]  # 3 steps of the global batch of 16 per epoch
        assert (tmp / "runs" / key / "summary.json").is_file()
    launched = "torch.distributed.run --standalone --nproc_per_node=2 -m pipeflow.launch"
    assert launched in results["runs"]["ddp2"]["command"]
    assert "pipeflow.cli train" in results["runs"]["e2e"]["command"]
    phases = [r["phase"] for r in results["runs"]["pipeline2-ddp"]["history"]]
    assert phases == ["by_parts", "finetune"]
    # the same data, seed, initial weights and global batch: DDP on 2 ranks computes what one device does
    assert results["runs"]["ddp2"]["test_bpd"] == pytest.approx(results["runs"]["e2e"]["test_bpd"], abs=1e-3)
    assert results["threads_per_rank"] == 1 and results["one_device_threads"] == 1


def test_compare_ranks_report_holds_the_verdict_and_every_figure(ranks_run):
    tmp, result, results = ranks_run
    verdict = results["verdict"]
    assert set(verdict) == {"e2e", "ddp2", "pipeline2-ddp"}
    by_parts = verdict["pipeline2-ddp"]
    assert by_parts["vs_ddp"]["bpd_diff"] == pytest.approx(by_parts["test_bpd"] - verdict["ddp2"]["test_bpd"])
    ratio = by_parts["train_seconds"] / verdict["e2e"]["train_seconds"]
    assert by_parts["vs_e2e"]["time_ratio"] == pytest.approx(ratio)
    fastest = min(e["train_seconds"] for e in results["runs"].values())
    assert all(e["equal_seconds"] == fastest for e in results["runs"].values())
    # EMA beside the raw weights where one process holds the whole model
    assert all(r.get("test_bpd_ema") is not None for r in results["runs"]["ddp2"]["history"])
    assert results["runs"]["pipeline2-ddp"]["history"][-1]["test_bpd_ema"] is not None
    report = (tmp / "report" / "report.md").read_text()
    assert "## Verdict" in report and "at equal wall-clock" in report and "![plots/bpd.png](plots/bpd.png)" in report
    assert results["command"] in report and is_png(tmp / "report" / "plots" / "bpd.png")
    assert "pipeline2-ddp" in result.stdout and "report.md" in result.stdout


def test_compare_ranks_reuses_finished_runs_and_resumes_an_unfinished_one(ranks_run):
    tmp, _, first = ranks_run
    (tmp / "runs" / "pipeline2-ddp" / "summary.json").unlink()  # killed after its last checkpoint
    result = compare_ranks_cli(tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp / "report" / "compare.json").read_text())
    assert [again["runs"][k]["start"] for k in again["order"]] == ["reuse", "reuse", "resume"]
    assert "pipeline2-ddp: resuming" in result.stderr and "--resume auto" in again["runs"]["pipeline2-ddp"]["command"]
    assert again["runs"]["ddp2"]["train_seconds"] == first["runs"]["ddp2"]["train_seconds"]  # not trained again
    assert again["runs"]["pipeline2-ddp"]["test_bpd"] == pytest.approx(first["runs"]["pipeline2-ddp"]["test_bpd"],
                                                                     abs=1e-6)


def test_runs_are_ordered_a_b_b_a_over_the_seeds():
    from pipeflow.tools.compare_ranks import parse_rank_runs, run_order

    plan = parse_rank_runs("e2e,ddp2", 2)
    order = [(run.key(seed, [0, 1]), seed) for run, seed in run_order(plan, [0, 1])]
    assert order == [("e2e-seed0", 0), ("ddp2-seed0", 0), ("ddp2-seed1", 1), ("e2e-seed1", 1)]
    three = run_order(parse_rank_runs(None, 2)[:3], [0, 1])
    positions = {}
    for i, (run, _) in enumerate(three):
        positions.setdefault(run.name, []).append(i)
    assert len({sum(p) for p in positions.values()}) == 1  # every run has the same mean position in time


@pytest.mark.parametrize("runs, ranks, message", [
    ("ddp3", 2, "unknown run 'ddp3'"), ("pipeline2-foo", 2, "unknown run"), ("e2e,e2e", 2, "twice"),
    (None, 1, "at least 2")])
def test_compare_ranks_bad_runs(runs, ranks, message):
    from pipeflow.tools.compare_ranks import parse_rank_runs

    with pytest.raises(UserError, match=message):
        parse_rank_runs(runs, ranks)


def test_the_ema_of_decay_zero_is_the_raw_weights(tmp_path):
    from pipeflow.train import train

    def history(decay):
        cfg = from_dict({**TINY, "train": {**TINY["train"], "samples": 0, "eval_ema": decay}})
        return train(cfg, tmp_path / str(decay), force=True)["history"]

    raw = history(1e-300)  # 0 switches the average off; a decay this small leaves 1 - decay == 1.0 exactly
    assert [r["test_bpd_ema"] for r in raw] == [r["test_bpd"] for r in raw]
    slow = history(0.9)
    assert [r["test_bpd"] for r in slow] == [r["test_bpd"] for r in raw]  # the average never touches training
    assert all(abs(r["test_bpd_ema"] - r["test_bpd"]) > 1e-4 for r in slow)
    with pytest.raises(UserError, match="eval_ema"):
        from_dict({"train": {"eval_ema": 1.0}})
