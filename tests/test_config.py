"""Config: TOML loading, --set overrides, TOML round trip, and every bad config value or file refused by the
command line in one line with exit status 2, losing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeflow.build import build_model
from pipeflow.config import Config, from_dict, load_config, parse_override, to_toml, with_overrides
from pipeflow.errors import UserError
from support import pipeflow_in_process, refused, snapshot, tiny, toml

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def test_load_tiny_toml(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert (cfg.model.levels, cfg.model.steps, cfg.model.hidden) == (2, 2, 8)
    assert cfg.train.schedule == "pipeline" and cfg.train.steps_per_epoch == 3
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-3
    assert cfg.distributed == Config().distributed  # untouched sections keep their defaults


def test_defaults_are_valid():
    defaults = Config()
    defaults.parts.count = 2  # left out (0), on one device: resolved to 2 parts
    assert load_config() == defaults


def test_overrides_are_typed(tiny_config_path):
    cfg = load_config(tiny_config_path, ["train.lr=3e-4", "parts.count=3", "model.lu=false",
                                         "train.schedule=alternate", "parts.cuts=[1, 3]", "train.grad_clip=5",
                                         'data.root="/tmp/x y"', "train.part_lrs=[1e-3, 2e-3, 1e-4]"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.parts.count == 3 and isinstance(cfg.parts.count, int)
    assert cfg.model.lu is False
    assert cfg.train.schedule == "alternate"  # a bare word is a string
    assert cfg.parts.cuts == [1, 3]
    assert cfg.train.grad_clip == 5.0 and isinstance(cfg.train.grad_clip, float)  # an int is a fine float
    assert cfg.data.root == "/tmp/x y"
    assert cfg.train.part_lrs == [1e-3, 2e-3, 1e-4]
    assert load_config(tiny_config_path).train.lr == 1e-3  # the file itself is not changed


# Each bad config value, refused by `pipeflow train --force` over an existing run: exit status 2, one line,
# and the run left as it was (a bad config must not cost the user the run it would have replaced).
BAD_VALUES = {
    "unknown section": (["--set", "nosuch.key=1"],
                        "unknown config section [nosuch]; known: model, data, parts, train, distributed, checkpoint"),
    "unknown key": (["--set", "model.colour=1"],
                    "unknown config key model.colour; known in [model]: levels, steps, hidden, coupling, lu"),
    "word for an integer": (["--set", "model.levels=two"], "model.levels must be an integer, got 'two'"),
    "fraction for an integer": (["--set", "model.levels=2.5"], "model.levels must be an integer, got 2.5"),
    "boolean for an integer": (["--set", "model.levels=true"], "model.levels must be an integer, got True"),
    "integer for a boolean": (["--set", "model.lu=1"], "model.lu must be true or false, got 1"),
    "word for a number": (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
    "number for a list": (["--set", "parts.cuts=3"], "parts.cuts must be a list, got 3"),
    "fraction in a list of integers": (["--set", "parts.cuts=[1, 2.5]"], "parts.cuts[1] must be an integer, got 2.5"),
    "number for a string": (["--set", "data.path=3"], "data.path must be a string, got 3"),
    "no levels": (["--set", "model.levels=0"], "model.levels = 0 must be at least 1"),
    "no steps": (["--set", "model.steps=0"], "model.steps = 0 must be at least 1"),
    "empty batches": (["--set", "train.batch_size=0"], "train.batch_size = 0 must be at least 1"),
    "negative lr": (["--set", "train.lr=-1e-3"], "train.lr = -0.001 must be positive"),
    "zero lr": (["--set", "train.lr=0"], "train.lr = 0.0 must be positive"),
    "more parts than steps": (["--set", "parts.count=5"], "parts.count = 5 is more than the 4 flow steps of the model"),
    "unknown schedule": (["--set", "train.schedule=fast"],
                         "train.schedule = 'fast' is not one of e2e, pipeline, alternate, sequential"),
    "unknown coupling": (["--set", "model.coupling=spline"],
                         "model.coupling = 'spline' is not one of affine, additive"),
    "an lr short": (["--set", "train.part_lrs=[1e-3]"], "train.part_lrs has 1 entries for parts.count = 2"),
    "too many bits": (["--set", "data.n_bits=9"], "data.n_bits = 9 must be at most 8"),
    "one grey level": (["--set", "data.levels=1"], "data.levels = 1 must be 0 (the data's own) or in 2..256"),
    "unknown boundary prior": (["--set", "parts.boundary_prior=magic"], "parts.boundary_prior = 'magic' is not one of "
                               "standard, learned, position, conditional, flow"),
    "npz without a path": (["--set", "data.dataset=npz"],
                           "data.dataset = 'npz' needs data.path, the .npz file to read"),
    # valid on its own, but 8x8 digits cannot be squeezed 4 times: caught when the model is built
    "levels too deep": (["--set", "model.levels=4"],
                        "image size 8 is not divisible by 2^model.levels = 16; lower model.levels"),
    "--set without =": (["--set", "noequals"], "--set expects section.key=value, got 'noequals'"),
    "--set without a section": (["--set", "nodot=1"], "--set expects section.key=value, got 'nodot=1'"),
}

# Each bad config file, by the file `--config` names (its text; None: the file does not exist).
BAD_FILES = {
    "missing": (None, "config file {path} does not exist"),
    "not TOML": ("[model\nlevels = 2\n",
                 "config file {path} is not valid TOML: Expected ']' at the end of a table declaration (at line 1, "
                 "column 7)"),
    "keys outside a section": ("levels = 2\n",
                               "unknown config section [levels]; known: model, data, parts, train, distributed, "
                               "checkpoint"),
    "a section that is no table": ("model = 3\n", "[model] must be a table of keys"),
}


@pytest.fixture
def a_run(tmp_path: Path) -> Path:
    """A folder holding a run, which `--force` would replace if the config were good."""
    run = tmp_path / "run"
    run.mkdir()
    for name, text in {"config.toml": toml(tiny()), "summary.json": '{"test_bpd": 3.0}', "metrics.jsonl": "{}\n",
                       "model.pt": "weights"}.items():
        (run / name).write_text(text)
    return run


def refused_without_loss(tmp_path: Path, message: str, *args) -> None:
    before = snapshot(tmp_path)
    result = pipeflow_in_process(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    refused(result.exit_code, result.stdout, result.stderr, message)
    assert snapshot(tmp_path) == before  # nothing written, replaced or deleted


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_value_is_one_line_and_status_2_and_replaces_nothing(tiny_config_path, a_run, tmp_path, case):
    overrides, message = BAD_VALUES[case]
    refused_without_loss(tmp_path, message, "train", "--config", tiny_config_path, "--out", a_run, "--force",
                         "--quiet", *overrides)


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_config_file_is_one_line_and_status_2_and_replaces_nothing(a_run, tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "config.toml"
    if text is not None:
        path.write_text(text)
    refused_without_loss(tmp_path, message.format(path=path), "train", "--config", path, "--out", a_run, "--force")


def test_plan_refuses_a_bad_value_too(tiny_config_path, tmp_path):
    """`pipeflow plan` reads the config as `train` does (its own command, so checked once here)."""
    refused_without_loss(tmp_path, "train.lr must be a number, got 'fast'", "plan", "--config", tiny_config_path,
                         "--set", "train.lr=fast", "--json", tmp_path / "plan.json")


def test_with_overrides_returns_a_validated_copy(tiny_config):
    changed = with_overrides(tiny_config, ["train.seed=5", "parts.scheme=blocks"])
    assert changed.train.seed == 5 and changed.parts.scheme == "blocks"
    assert tiny_config.train.seed == 0 and tiny_config.parts.scheme == "across"
    with pytest.raises(UserError):
        with_overrides(tiny_config, ["train.seed=-"])


def test_to_toml_round_trip(tmp_path, tiny_config):
    cfg = with_overrides(tiny_config, ['data.root="C:\\\\data \\"quoted\\""', "parts.cuts=[1, 2]", "parts.count=3",
                                       "parts.scheme=cuts", "train.part_lrs=[0.001, 0.0005, 1e-05]"])
    assert cfg.data.root == 'C:\\data "quoted"'
    path = tmp_path / "round.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert from_dict(cfg.to_dict()) == cfg


def test_parse_override():
    assert parse_override(" train.lr = 1e-3 ") == ("train", "lr", 1e-3)
    assert parse_override("data.path=a=b.npz") == ("data", "path", "a=b.npz")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_builds_its_model_and_parts(path):
    from pipeflow.data import KNOWN_SHAPES
    from pipeflow.build import build_parts

    cfg = load_config(path)
    # the shape of its images, without the data (an npz config names its data set in the file name)
    shape = KNOWN_SHAPES.get(cfg.data.dataset) or KNOWN_SHAPES[Path(cfg.data.path).stem]
    model = build_model(cfg, shape)
    parts = build_parts(cfg, model)
    assert len(parts) == cfg.parts.count
    assert parts[0].in_shape == shape and parts[-1].out_shape == model.latent_shape
    assert [p.steps.start for p in parts] == sorted(p.steps.start for p in parts)
    steps = [(p.steps.start + 1, p.steps.stop) for p in parts]
    if path.name == "cifar10_glow.toml":  # the paper's 2 parts across blocks: 1/2 | 1/2, 2, 3
        assert steps == [(1, 16), (17, 96)]
    if path.name == "cifar10_glow_3part.toml":
        assert steps == [(1, 16), (17, 48), (49, 96)]


def test_shipped_configs_exist():
    assert {"demo.toml", "cifar10_glow.toml", "cifar10_glow_3part.toml"} <= {p.name for p in CONFIGS}
