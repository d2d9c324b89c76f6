"""Data: the bundled digits, .npz files (good and malformed), deterministic dequantised batches."""

from __future__ import annotations

import importlib.machinery

import numpy as np
import pytest
import torch

from pipeflow.config import DataConfig
from pipeflow.data import Batches, dataset_shape, dequantize, load_dataset, load_npz, n_bins
from pipeflow.errors import UserError


def _images(n, c=1, size=8, high=256, seed=0):
    return np.random.default_rng(seed).integers(0, high, size=(n, c, size, size), dtype=np.uint8)


def _write_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.fixture
def good_npz(tmp_path):
    return _write_npz(tmp_path / "good.npz", x_train=_images(40, 3), y_train=np.zeros(40, np.uint8),
                      x_test=_images(12, 3, seed=1), y_test=np.zeros(12, np.uint8))


def test_digits_read_from_scikit_learns_file_are_its_load_digits(monkeypatch):
    """The CSV read directly (no ``import sklearn.datasets``) holds load_digits()'s pixels, in its order; a
    scikit-learn laid out otherwise falls back to load_digits itself."""
    from sklearn.datasets import load_digits

    import pipeflow.data as data

    expected = load_digits().data
    assert np.array_equal(data._digits_pixels(), expected)
    for spec in (None, importlib.machinery.ModuleSpec("sklearn", None)):  # none found; a module, not a folder
        monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, spec=spec: spec)
        assert np.array_equal(data._digits_pixels(), expected)


def test_digits():
    data = load_dataset(DataConfig())
    assert data.shape == (1, 8, 8) and data.levels == 17
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.uint8 and int(data.x_train.max()) == 16 and int(data.x_train.min()) == 0
    assert n_bins(data, 0) == 17
    assert dataset_shape(DataConfig()) == (1, 8, 8)
    limited = load_dataset(DataConfig(train_limit=100, test_limit=10))
    assert len(limited.x_train) == 100 and len(limited.x_test) == 10
    with pytest.raises(UserError, match="n_bits"):
        load_dataset(DataConfig(n_bits=4))  # 17-level data cannot be reduced to 4 bits


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_loading(tmp_path, compressed):
    x_train, x_test = _images(40, 3), _images(12, 3, seed=1)
    path = _write_npz(tmp_path / "set.npz", compressed, x_train=x_train, y_train=np.zeros(40, np.uint8),
                      x_test=x_test, y_test=np.zeros(12, np.uint8))
    data = load_dataset(DataConfig(dataset="npz", path=str(path)))
    assert data.name == "set" and data.shape == (3, 8, 8) and data.levels == 256
    assert torch.equal(data.x_train, torch.from_numpy(x_train)) and torch.equal(data.x_test, torch.from_numpy(x_test))
    assert dataset_shape(DataConfig(dataset="npz", path=str(path))) == (3, 8, 8)
    assert n_bins(data, 5) == 32


def test_levels_are_never_guessed_from_the_pixels(tmp_path):
    """0..16 pixels are 17 levels only when the file or the config says so; a dark 8-bit image has 256."""
    dark = _write_npz(tmp_path / "dark.npz", x_train=_images(10, high=17), x_test=_images(4, high=17))
    assert load_npz(dark).levels == 256
    assert load_dataset(DataConfig(dataset="npz", path=str(dark), levels=17)).levels == 17
    digits = _write_npz(tmp_path / "d.npz", x_train=_images(10, high=17), x_test=_images(4, high=17),
                        levels=np.array(17))
    assert load_npz(digits).levels == 17 and load_npz(digits, 17).levels == 17
    assert load_dataset(DataConfig(levels=17)).levels == 17
    for bad, words in [(lambda: load_npz(digits, 256), "says its images have 17"),
                       (lambda: load_npz(dark, 8), "beyond its 8 levels"),
                       (lambda: load_dataset(DataConfig(levels=16)), "the digits data set says its images have 17"),
                       (lambda: load_npz(_write_npz(tmp_path / "b.npz", x_train=_images(2), x_test=_images(2),
                                                    levels=np.array([17, 17]))), "one integer")]:
        with pytest.raises(UserError, match=words):
            bad()


def test_a_dark_8bit_image_is_scored_on_256_levels(tmp_path):
    """The bits/dim of dark 8-bit data use 256 bins: the dequantised pixels and log(n_bins) both say so."""
    from pipeflow.build import build_run
    from pipeflow.config import from_dict
    from pipeflow.objective import bits_per_dim

    dark = _write_npz(tmp_path / "dark.npz", x_train=_images(20, high=9), x_test=_images(8, high=9))
    cfg = from_dict({"data": {"dataset": "npz", "path": str(dark)}, "model": {"levels": 2, "steps": 1, "hidden": 4},
                     "train": {"batch_size": 4, "schedule": "e2e"}})
    run = build_run(cfg)
    assert run.n_bins == 256
    x = next(run.train_batches().epoch(0))
    assert float(x.max()) < 9 / 256 - 0.5  # every pixel below 9 lands in a bin of width 1/256
    log_p = torch.zeros(1)
    assert bits_per_dim(log_p, 64, run.n_bins).item() == pytest.approx(8.0)  # log2(256) at density 1


@pytest.mark.parametrize("case, words", [
    ("missing_file", "does not exist"),
    ("missing_key", "lacks x_test"),
    ("float_dtype", "must be uint8"),
    ("three_dims", "must be uint8 images (N, C, H, W)"),
    ("not_a_zip", "not a readable .npz"),
    ("channels_last", "channels-last"),
    ("not_square", "square"),
    ("shape_mismatch", "differ"),
    ("empty", "no training or no test images"),
])
def test_malformed_npz_is_a_user_error(tmp_path, case, words):
    path = tmp_path / f"{case}.npz"
    good = {"x_train": _images(10), "x_test": _images(4)}
    arrays = {
        "missing_key": {"x_train": _images(10)},
        "float_dtype": {**good, "x_train": _images(10).astype(np.float32)},
        "three_dims": {**good, "x_train": _images(10)[:, 0]},
        "channels_last": {"x_train": _images(10, 3).transpose(0, 2, 3, 1).copy(),
                          "x_test": _images(4, 3).transpose(0, 2, 3, 1).copy()},
        "not_square": {**good, "x_train": np.zeros((10, 1, 8, 4), np.uint8)},
        "shape_mismatch": {**good, "x_test": _images(4, size=16)},
        "empty": {**good, "x_test": np.zeros((0, 1, 8, 8), np.uint8)},
    }
    if case == "not_a_zip":
        path.write_text("this is not a zip archive\n")
    elif case != "missing_file":
        _write_npz(path, **arrays[case])
    with pytest.raises(UserError) as info:
        load_dataset(DataConfig(dataset="npz", path=str(path)))
    assert words in str(info.value) and str(path) in str(info.value)


def test_dataset_shape_of_a_bad_npz(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dataset_shape(DataConfig(dataset="npz", path=str(tmp_path / "none.npz")))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError):
        dataset_shape(DataConfig(dataset="npz", path=str(junk)))
    no_test = _write_npz(tmp_path / "no_test.npz", x_train=_images(3))
    with pytest.raises(UserError):
        dataset_shape(DataConfig(dataset="npz", path=str(no_test)))


def test_batches_are_deterministic_and_in_range():
    images = torch.from_numpy(_images(50, high=17))
    a = Batches(images, 17, 0, batch_size=8, seed=3)
    b = Batches(images, 17, 0, batch_size=8, seed=3)
    assert len(a) == 6  # drop_last
    ea, eb = list(a.epoch(2)), list(b.epoch(2))
    assert len(ea) == 6 and all(x.shape == (8, 1, 8, 8) for x in ea)
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))
    assert not torch.equal(ea[0], next(a.epoch(3)))  # another epoch: another order and other noise
    assert not torch.equal(ea[0], next(Batches(images, 17, 0, 8, seed=4).epoch(2)))
    all_x = torch.cat(ea)
    assert all_x.min() >= -0.5 and all_x.max() < 0.5
    assert len(Batches(images, 17, 0, 8, seed=3, max_batches=2)) == 2
    assert len(Batches(images, 17, 0, 8, seed=3, shuffle=False, drop_last=False)) == 7
    with pytest.raises(UserError, match="batch size"):
        Batches(images, 17, 0, batch_size=64, seed=0)


def test_dequantisation_stays_inside_each_bin():
    x_int = torch.from_numpy(_images(20, high=256))
    gen = torch.Generator().manual_seed(0)
    x = dequantize(x_int, 256, 0, gen)
    assert torch.equal(torch.floor((x.double() + 0.5) * 256).to(torch.uint8), x_int)
    # with n_bits = 3, 256 levels become 8 bins of 32 grey levels each
    x3 = dequantize(x_int, 256, 3, gen)
    assert torch.equal(torch.floor((x3.double() + 0.5) * 8).long(), x_int.long() // 32)
