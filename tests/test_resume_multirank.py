"""Resuming across ranks: how many checkpoints the pipeline's skew needs, which step every rank can resume
from, killed ranks restarted by torchrun, a silent rank failing its peers in bounded time, and the
resumes that are refused (another world size, another config, one device resuming several ranks).

The tests run tiny models on CPU with gloo; faults are injected by ``tests/faults.py`` (``pipeflow.launch``
with the failures that PIPEFLOW_TEST_FAULT names).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys

import pytest

from pipeflow.config import load_config, with_overrides
from pipeflow.distributed.topology import Topology
from pipeflow.errors import UserError
from support import (CHECKPOINTED_MULTIRANK, ENV, ROOT, comparable_metrics, launch_lines, max_difference, ok,
                     snapshot, summary, torchrun, write_config)

# internals of the training core that issue 10's rewrite may rename or move
from pipeflow.multirank import check_keep, plan_resume
from pipeflow.train import train


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


@pytest.fixture(scope="module")
def multi_reference(tmp_path_factory):
    """An uninterrupted run of 2 ranks, every step checkpointed: its config and its run directory."""
    folder = tmp_path_factory.mktemp("multi")
    config = write_config(folder, CHECKPOINTED_MULTIRANK)
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
    assert max_difference(out, reference) <= 1e-6
    assert comparable_metrics(out) == comparable_metrics(reference)
    mine, theirs = summary(out), summary(reference)
    assert mine["comm"] == theirs["comm"] and mine["steps"] == theirs["steps"] == 15
    assert mine["test_bpd"] == theirs["test_bpd"]


def _start_ranks(config, out, world: int, fault: str) -> list[subprocess.Popen]:
    """``world`` ranks of pipeflow.launch (with ``fault``) started by hand (not torchrun, which would stop the
    others at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PIPEFLOW_TEST_FAULT": fault}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.faults", "--config", str(config), "--out",
                                       str(out)], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _outcomes_while_one_is_stopped(procs: list[subprocess.Popen], stopped: int) -> dict[int, tuple[int, str]]:
    """Wait (bounded) for every rank but ``stopped``; then kill it. Returns ``{rank: (status, stderr)}``."""
    try:
        results = {}
        for rank, p in enumerate(procs):
            if rank != stopped:
                _, err = p.communicate(timeout=120)  # bounded: start-up, a few steps, then the timeout's silence
                results[rank] = (p.returncode, err)
        assert procs[stopped].poll() is None  # still stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return results


def test_a_silent_rank_fails_every_other_rank_in_bounded_time(tmp_path):
    """Rank 1 of 3 stops (SIGSTOP) after step 3 of the by-parts phase; ranks 0 and 2 must give up after
    distributed.timeout_s (12 s: the start-up of three processes on two busy cores must fit in it too)."""
    config = write_config(tmp_path, CHECKPOINTED_MULTIRANK, {"parts.count": 3, "distributed.timeout_s": 12,
                                                             "checkpoint.every_steps": 0, "train.finetune_epochs": 0})
    results = _outcomes_while_one_is_stopped(_start_ranks(config, tmp_path / "run", 3, "stop:1:3"), stopped=1)
    code0, err0 = results[0]
    code2, err2 = results[2]
    assert code0 == 1 and code2 == 1
    assert len(launch_lines(err0, "failed")) == 1 and len(launch_lines(err2, "failed")) == 1
    assert launch_lines(err0, "failed")[0].startswith(
        "pipeflow.launch: failed (rank 0): rank 0 could not send to rank 1: rank 1 took nothing for 12 s "
        "(distributed.timeout_s), or the link broke:")
    assert launch_lines(err2, "failed")[0].startswith(
        "pipeflow.launch: failed (rank 2): rank 2 heard nothing from rank 1 for 12 s (distributed.timeout_s), "
        "or lost the link:")
    assert "Traceback" not in err0 + err2


@pytest.mark.parametrize("fault, finetune, where", [
    ("stop:1:eval", "ddp", "rank 0 could not send to rank 1"),  # stage 1 falls silent at the epoch's evaluation
    ("stop:1:gather", "ddp", "gathering the parts"),
    ("stop:1:7", "ddp", "data-parallel fine-tuning"),  # step 2 of fine-tuning, inside DDP's all-reduce
    ("stop:1:finetune", "rank0", "handing over to rank 0"),
], ids=["evaluation", "gather", "ddp-fine-tuning", "rank0-fine-tuning"])
def test_a_silent_rank_fails_the_other_in_every_phase(tmp_path, fault, finetune, where):
    """Rank 1 of 2 stops (SIGSTOP) in a later phase of the run; rank 0 must exit 1 with one line naming what
    got no answer, after distributed.timeout_s (12 s), not wait for ever."""
    config = write_config(tmp_path, CHECKPOINTED_MULTIRANK, {"parts.count": 2, "distributed.timeout_s": 12,
                                                             "checkpoint.every_steps": 0, "train.by_parts_epochs": 1,
                                                             "train.finetune_epochs": 1,
                                                             "distributed.finetune": finetune})
    results = _outcomes_while_one_is_stopped(_start_ranks(config, tmp_path / "run", 2, fault), stopped=1)
    code0, err0 = results[0]
    assert code0 == 1, err0[-3000:]
    (line,) = launch_lines(err0, "failed")
    assert line.startswith("pipeflow.launch: failed (rank 0): ") and where in line and "12 s" in line, line
    assert "Traceback" not in err0


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
