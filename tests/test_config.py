"""Config: TOML loading, --set overrides, validation (each error one UserError naming the key), TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeflow.config import Config, from_dict, load_config, parse_override, to_toml, with_overrides
from pipeflow.data import dataset_shape
from pipeflow.errors import UserError
from pipeflow.build import build_model

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


@pytest.mark.parametrize("override, words", [
    ("nosuch.key=1", "unknown config section"),
    ("train.nosuch=1", "unknown config key train.nosuch"),
    ("model.levels=two", "model.levels must be an integer"),
    ("model.levels=2.5", "model.levels must be an integer"),
    ("model.levels=true", "model.levels must be an integer"),
    ("model.lu=1", "model.lu must be true or false"),
    ("train.lr=fast", "train.lr must be a number"),
    ("parts.cuts=3", "parts.cuts must be a list"),
    ("parts.cuts=[1, 2.5]", "parts.cuts[1] must be an integer"),
    ("data.path=3", "data.path must be a string"),
    ("model.levels=0", "model.levels = 0 must be at least 1"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=-1e-3", "train.lr = -0.001 must be positive"),
    ("train.lr=0", "train.lr"),
    ("parts.count=5", "parts.count = 5 is more than the 4 flow steps"),
    ("train.schedule=fast", "train.schedule = 'fast' is not one of"),
    ("model.coupling=spline", "model.coupling"),
    ("train.part_lrs=[1e-3]", "train.part_lrs has 1 entries"),
    ("data.n_bits=9", "data.n_bits"),
    ("data.dataset=npz", "needs data.path"),
    ("noequals", "--set expects section.key=value"),
    ("nodot=1", "--set expects section.key=value"),
])
def test_bad_values_are_user_errors(tiny_config_path, override, words):
    with pytest.raises(UserError) as info:
        load_config(tiny_config_path, [override])
    message = str(info.value)
    assert words in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nlevels = 2\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("levels = 2\n")
    with pytest.raises(UserError, match="unknown config section"):
        load_config(flat)
    not_table = tmp_path / "not_table.toml"
    not_table.write_text("model = 3\n")
    with pytest.raises(UserError, match="must be a table"):
        load_config(not_table)


def test_image_size_not_divisible_is_caught_when_building_the_model(tiny_config):
    cfg = with_overrides(tiny_config, ["model.levels=4"])  # valid on its own ...
    with pytest.raises(UserError, match="not divisible by 2\\^model.levels = 16"):
        build_model(cfg, dataset_shape(cfg.data))  # ... but 8x8 digits cannot be squeezed 4 times


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
