"""Image data: loading, deterministic batching and uniform dequantisation.

All data sets are held in memory as uint8 tensors (N, C, H, W). A model sees

    x = (x_int + u) / n_bins - 1/2,    u ~ U[0, 1)^D

so that a continuous density on x gives a lower bound on the discrete likelihood
(:func:`pipeflow.objective.bits_per_dim` adds the ``D log n_bins`` that goes with it).
Batch order and dequantisation noise come from generators seeded by (seed, epoch), so a
run is reproducible and every pipeline rank can agree on what batch b is.
"""

from __future__ import annotations

import importlib.util
import itertools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeflow.config import DataConfig
from pipeflow.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
TEST_NOISE_SEED = 1_000_003


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W), values in [0, levels)
    x_test: torch.Tensor
    levels: int  # grey levels of the stored data: 256 for 8-bit images, 17 for the digits

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _digits_pixels() -> np.ndarray:
    """The 1797 digits' pixels, (1797, 64) in 0..16, from the CSV scikit-learn ships.

    Read straight from the package's folder: ``import sklearn.datasets`` costs a second or two of
    imports (SciPy's among them) in every process that loads the set, every rank of a launch included.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    folders = spec.submodule_search_locations if spec else None  # None: not a package folder
    csv = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if csv is None or not csv.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits  # noqa: PLC0415

        return load_digits().data
    return np.loadtxt(csv, delimiter=",", dtype=np.float64)[:, :64]  # the 65th column is the label


def _load_digits(levels: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, 17 grey levels): no download, ever."""
    images = torch.from_numpy(_digits_pixels().astype(np.uint8).reshape(-1, 1, 8, 8))
    n_train = 1437  # the usual 80/20 split, in the bundled order
    levels = resolve_levels("the digits data set", levels, 17, int(images.max()))
    return ImageData("digits", images[:n_train].contiguous(), images[n_train:].contiguous(), levels)


def resolve_levels(where: str, asked: int, stored: int, highest: int) -> int:
    """The grey levels data is scored on, never guessed from its pixels.

    ``asked`` is ``data.levels`` (0: not given), ``stored`` what the data says of itself (0:
    nothing, which for uint8 images means 256). A dark 8-bit image is 8-bit all the same.
    """
    if asked and stored and asked != stored:
        raise UserError(f"data.levels = {asked} but {where} says its images have {stored} levels")
    levels = asked or stored or 256
    if highest >= levels:
        raise UserError(f"{where} has a pixel of value {highest}, beyond its {levels} levels (set data.levels)")
    return levels


def load_npz(path: str | Path, levels: int = 0) -> ImageData:
    """A file with uint8 arrays x_train, y_train, x_test, y_test, images NCHW (see ../shared/data).

    An optional scalar ``levels`` in the file gives its grey levels (17 for 0..16 digits); without
    it, or ``levels`` here (``data.levels``), uint8 images have 256.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "x_test") if k not in f.files]
            if missing:
                raise UserError(f"data file {path} lacks {', '.join(missing)} (expected keys {', '.join(NPZ_KEYS)})")
            x_train, x_test = f["x_train"], f["x_test"]
            stored = f["levels"] if "levels" in f.files else np.zeros((), np.int64)
    except UserError:
        raise
    except Exception as exc:  # zipfile, pickle and format errors alike: the file is not a usable npz
        raise UserError(f"data file {path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise UserError(f"data file {path}: {key} must be uint8 images (N, C, H, W), got {x.dtype} {x.shape}")
        if x.shape[1] == x.shape[2] > x.shape[3]:  # (N, H, W, C): checked first, or it reads as 'not square'
            raise UserError(f"data file {path}: {key} looks channels-last {x.shape}; store images as (N, C, H, W)")
        if x.shape[2] != x.shape[3]:
            raise UserError(f"data file {path}: {key} images must be square, got {x.shape[2]}x{x.shape[3]}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"data file {path}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ")
    if len(x_train) == 0 or len(x_test) == 0:
        raise UserError(f"data file {path} holds no training or no test images")
    if stored.shape != () or stored.dtype.kind not in "iu" or not (stored == 0 or 2 <= stored <= 256):
        raise UserError(f"data file {path}: levels must be one integer in 2..256, got {stored!r}")
    highest = int(max(x_train.max(), x_test.max()))
    levels = resolve_levels(f"data file {path}", levels, int(stored), highest)
    return ImageData(path.stem, torch.from_numpy(x_train), torch.from_numpy(x_test), levels)


def _load_torchvision(name: str, root: str, download: bool, levels: int = 0) -> ImageData:
    import torchvision  # noqa: PLC0415

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    root = str(Path(root).expanduser())
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, OSError) as exc:
        hint = "set data.download = true (needs internet)" if not download else "check the network"
        raise UserError(
            f"dataset {name} is not in {root} ({exc.__class__.__name__}); {hint}, "
            f"or use data.dataset = 'npz' with data.path pointing at a local copy"
        ) from None

    def images(ds) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(ds.data))
        return x.unsqueeze(1).contiguous() if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()

    x_train, x_test = images(train), images(test)
    levels = resolve_levels(f"dataset {name}", levels, 256, int(max(x_train.max(), x_test.max())))
    return ImageData(name, x_train, x_test, levels)


def load_dataset(cfg: DataConfig) -> ImageData:
    if cfg.dataset == "digits":
        data = _load_digits(cfg.levels)
    elif cfg.dataset == "npz":
        data = load_npz(cfg.path, cfg.levels)
    else:
        data = _load_torchvision(cfg.dataset, cfg.root, cfg.download, cfg.levels)
    if cfg.n_bits and data.levels != 256:
        raise UserError(f"data.n_bits applies to 8-bit images; {data.name} has {data.levels} levels (use n_bits = 0)")
    if cfg.train_limit:
        data.x_train = data.x_train[: cfg.train_limit]
    if cfg.test_limit:
        data.x_test = data.x_test[: cfg.test_limit]
    return data


KNOWN_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def dataset_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """The image shape (C, H, W) without loading the images (for planning)."""
    if cfg.dataset in KNOWN_SHAPES:
        return KNOWN_SHAPES[cfg.dataset]
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x_test.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read_header(f)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"data file {path} is not a readable .npz file with x_test ({type(exc).__name__})") from None
    if len(shape) != 4:
        raise UserError(f"data file {path}: x_test must be images (N, C, H, W), got shape {shape}")
    return tuple(int(s) for s in shape[1:])


def n_bins(data: ImageData, n_bits: int) -> int:
    """Number of discrete levels per dimension the model is scored on."""
    return 2**n_bits if n_bits else data.levels


def dequantize(x_int: torch.Tensor, levels: int, n_bits: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 images -> floats in [-1/2, 1/2) with uniform noise inside each bin."""
    x = x_int.float()
    bins = levels
    if n_bits and levels == 256:
        x = torch.floor(x / 2 ** (8 - n_bits))
        bins = 2**n_bits
    noise = torch.rand(x.shape, generator=generator)
    return (x + noise) / bins - 0.5


class Batches:
    """Deterministic batches of dequantised images: epoch e of seed s is always the same."""

    def __init__(self, images: torch.Tensor, levels: int, n_bits: int, batch_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True, max_batches: int = 0):
        if len(images) < batch_size and drop_last:
            raise UserError(f"batch size {batch_size} is larger than the {len(images)} images available")
        self.images, self.levels, self.n_bits = images, levels, n_bits
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = len(self.images) // self.batch_size if self.drop_last else -(-len(self.images) // self.batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The batches of ``epoch``, from batch index ``start`` on.

        Skipping batches (to resume mid-epoch) gives exactly the batches an uninterrupted
        epoch would have yielded: the skipped batches' noise is drawn and thrown away, so the
        noise generator stands where it would have stood (a cost far below one training step).
        """
        order_gen = torch.Generator().manual_seed(self.seed * 1_000_033 + epoch)
        noise_gen = torch.Generator().manual_seed(self.seed * 1_000_037 + epoch + 7)
        n = len(self.images)
        order = torch.randperm(n, generator=order_gen) if self.shuffle else torch.arange(n)
        if not 0 <= start <= len(self):
            raise ValueError(f"cannot start epoch {epoch} at batch {start} of {len(self)}")
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if b < start:
                torch.rand((len(idx), *self.images.shape[1:]), generator=noise_gen)  # what dequantize would draw
                continue
            yield dequantize(self.images[idx], self.levels, self.n_bits, noise_gen)

    def first(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` batches of the run, epoch after epoch (epochs repeat if one is shorter)."""
        return list(itertools.islice((x for e in itertools.count() for x in self.epoch(e)), count))


def train_batches(data: ImageData, cfg_data: DataConfig, batch_size: int, seed: int, max_batches: int = 0) -> Batches:
    return Batches(data.x_train, data.levels, cfg_data.n_bits, batch_size, seed, max_batches=max_batches)


def test_batches(data: ImageData, cfg_data: DataConfig, batch_size: int) -> Batches:
    """The test set in order, with fixed dequantisation noise so test bpd is comparable across runs."""
    return Batches(data.x_test, data.levels, cfg_data.n_bits, batch_size, TEST_NOISE_SEED,
                   shuffle=False, drop_last=False)
