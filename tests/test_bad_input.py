"""Bad input on the command line, outside the config's values (those are in test_config.py): data files, run
directories, checkpoints, --resume. Each is refused once here, with exit status 2, exactly one line on stderr
naming the problem and what to do, and nothing lost: no run, checkpoint or other file written, replaced,
created or deleted (even with --force, which would replace a run were the input good).

Multi-rank refusals (another world size or config under torchrun) are in test_resume_multirank.py, and the
process count's in test_distributed.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import pipeflow, pipeflow_in_process, refused, snapshot


@dataclass
class Inputs:
    """The files the bad inputs name: a config, a finished and an interrupted run, and broken copies."""

    config: Path
    finished: Path  # a whole run directory
    interrupted: Path  # killed after step 5: checkpoints up to step 4, no model.pt
    files: Path  # a folder of broken files, and where new outputs would go

    def step_4(self, run: Path) -> Path:
        return run / "checkpoints" / "rank0" / "step-000000004.pt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, checkpointed_config_path, reference_run, interrupted_run) -> Inputs:
    files = tmp_path_factory.mktemp("bad_input")
    (files / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (files / "truncated.pt").write_bytes((reference_run / "model.pt").read_bytes()[:2000])
    (files / "bad.npz").write_bytes(b"PK\x03\x04 this is no zip archive")
    # an interrupted run without its config.toml: only the checkpoint itself tells which config it had
    shutil.copytree(interrupted_run, files / "no_config")
    (files / "no_config" / "config.toml").unlink()
    # an interrupted run whose newest checkpoint was torn by something other than pipeflow
    shutil.copytree(interrupted_run, files / "torn")
    torn = files / "torn" / "checkpoints" / "rank0" / "step-000000004.pt"
    torn.write_bytes(torn.read_bytes()[:1000])
    return Inputs(checkpointed_config_path, reference_run, interrupted_run, files)


def _train(i: Inputs, out: Path, *args) -> tuple:
    return ("train", "--config", i.config, "--out", out, "--quiet", *args)


# Each case: the inputs -> (the command line, the one line it must print after "pipeflow: error: ").
CASES = {
    "missing data file": lambda i: (
        _train(i, i.finished, "--force", "--set", "data.dataset=npz", "--set", f"data.path={i.files / 'none.npz'}"),
        f"data file {i.files / 'none.npz'} does not exist"),
    "malformed data file": lambda i: (
        _train(i, i.finished, "--force", "--set", "data.dataset=npz", "--set", f"data.path={i.files / 'bad.npz'}"),
        f"data file {i.files / 'bad.npz'} is not a readable .npz file (BadZipFile: File is not a zip file)"),
    "output holds another run": lambda i: (
        _train(i, i.finished),
        f"output directory {i.finished} holds another run (config.toml); pass --resume auto to continue it "
        "or --force to replace it"),
    "unknown --resume": lambda i: (
        _train(i, i.finished, "--force", "--resume", "latest"),
        "--resume takes 'auto' (continue from the newest checkpoint in --out), not 'latest'"),
    "resume with another config": lambda i: (
        _train(i, i.interrupted, "--resume", "auto", "--set", "model.hidden=16"),
        f"output directory {i.interrupted} holds a run with another config (model.hidden = 8 there, 16 here); "
        "resume it with its own config, or pass --force to replace it"),
    "resume a checkpoint of another config": lambda i: (
        _train(i, i.files / "no_config", "--resume", "auto", "--set", "train.seed=7"),
        f"checkpoint {i.step_4(i.files / 'no_config')} belongs to a run with another config "
        "(train.seed = 0 there, 7 here); resume with that run's config, or pass --force to start afresh"),
    "resume a torn checkpoint": lambda i: (
        _train(i, i.files / "torn", "--resume", "auto"),
        f"checkpoint {i.step_4(i.files / 'torn')} is corrupt or not a pipeflow file (RuntimeError)"),
    "eval of a training checkpoint": lambda i: (
        ("eval", "--checkpoint", i.step_4(i.interrupted)),
        f"checkpoint {i.step_4(i.interrupted)} is not a pipeflow.model/1 file; it is a training checkpoint of one "
        "rank: use the run directory's model.pt, or continue the run with --resume auto"),
    "eval of a file that is no checkpoint": lambda i: (
        ("eval", "--checkpoint", i.files / "garbage.pt", "--json", i.files / "eval.json"),
        f"checkpoint {i.files / 'garbage.pt'} is corrupt or not a pipeflow file (UnpicklingError)"),
    "sample from a truncated model": lambda i: (
        ("sample", "--checkpoint", i.files / "truncated.pt", "--out", i.files / "samples.png"),
        f"checkpoint {i.files / 'truncated.pt'} is corrupt or not a pipeflow file (RuntimeError)"),
    "eval of a missing checkpoint": lambda i: (
        ("eval", "--checkpoint", i.files / "none.pt"),
        f"checkpoint {i.files / 'none.pt'} does not exist"),
}

# every case runs in-process; these few also through a fresh interpreter, as a user runs them
IN_A_SUBPROCESS = ["missing data file", "output holds another run", "eval of a file that is no checkpoint"]


def everything(i: Inputs) -> dict:
    return {str(folder): snapshot(folder) for folder in (i.config.parent, i.finished, i.interrupted, i.files)}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_status_2_and_loses_nothing(inputs, case):
    args, message = CASES[case](inputs)
    before = everything(inputs)
    result = pipeflow_in_process(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    refused(result.exit_code, result.stdout, result.stderr, message)
    assert everything(inputs) == before


@pytest.mark.parametrize("case", IN_A_SUBPROCESS)
def test_bad_input_in_a_subprocess(inputs, case):
    args, message = CASES[case](inputs)
    before = everything(inputs)
    result = pipeflow(*args)
    refused(result.returncode, result.stdout, result.stderr, message)
    assert everything(inputs) == before
