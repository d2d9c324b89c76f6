"""Building a run from a config: data, model, parts, devices. Shared by every entry point.

Every process that builds from the same config gets bit-identical initial parameters,
because the model is built right after seeding; that is how pipeline ranks agree on the
parts without exchanging them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from pipeflow.config import Config
from pipeflow.data import Batches, ImageData, load_dataset, n_bins, test_batches, train_batches
from pipeflow.errors import UserError
from pipeflow.glow import Glow
from pipeflow.parts import Part, split_into_parts


@dataclass
class Run:
    cfg: Config
    data: ImageData
    model: Glow
    parts: list[Part]
    n_bins: int

    @property
    def num_dims(self) -> int:
        c, h, w = self.model.input_shape
        return c * h * w

    def train_batches(self, batch_size: int | None = None) -> Batches:
        t = self.cfg.train
        return train_batches(self.data, self.cfg.data, batch_size or t.batch_size, t.seed, t.steps_per_epoch)

    def test_batches(self) -> Batches:
        return test_batches(self.data, self.cfg.data, self.cfg.train.eval_batch_size)

    def part_lr(self, k: int) -> float:
        return part_lr(self.cfg, k, len(self.parts))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: Config, shape: tuple[int, int, int]) -> Glow:
    c, h, w = shape
    m = cfg.model
    if h % 2**m.levels:
        raise UserError(f"image size {h} is not divisible by 2^model.levels = {2**m.levels}; lower model.levels")
    torch.manual_seed(cfg.train.seed)
    return in_memory_format(Glow(c, h, m.levels, m.steps, m.hidden, m.coupling, m.lu), cfg)


def in_memory_format(module: nn.Module, cfg: Config) -> nn.Module:
    """With train.channels_last, the module's 4-d parameters in NHWC (in place).

    A convolution whose weight is channels_last computes in that layout and hands it on, so the
    activations follow the weights with no conversion at the inputs; moving to a device, loading a
    state dict and Adam's moments keep each parameter's layout.
    """
    return module.to(memory_format=torch.channels_last) if cfg.train.channels_last else module


def build_parts(cfg: Config, model: Glow, count: int | None = None, scheme: str | None = None,
                cuts: Sequence[int] | None = None, step_costs: Sequence[float] | None = None) -> list[Part]:
    """The one part builder: ``count`` parts (default parts.count) of ``scheme`` (default parts.scheme).

    ``cuts`` replaces parts.cuts (scheme ``cuts``); ``balanced`` balances ``step_costs`` if given
    (measured ones, say), else the FLOP model's, boundary priors included. One part is the whole model,
    whatever the scheme.
    """
    p = cfg.parts
    scheme, count = scheme or p.scheme, count or p.count
    boundary_costs: list[float] = []
    if scheme == "balanced" and not step_costs and count > 1:
        from pipeflow.tools.flops import boundary_prior_flops, step_flops  # noqa: PLC0415

        step_costs, boundary_costs = step_flops(model), boundary_prior_flops(model, p.boundary_prior)
    parts = split_into_parts(model, scheme, count, p.cuts if cuts is None else cuts, p.boundary_prior,
                             step_costs or (), boundary_costs)
    return [in_memory_format(part, cfg) for part in parts]  # the boundary priors' own weights


def part_lr(cfg: Config, k: int, parts: int) -> float:
    """Part k's learning rate: train.part_lrs[k] when the model is cut (one part, the whole model: train.lr)."""
    t = cfg.train
    return t.part_lrs[k] if t.part_lrs and parts > 1 else t.lr


def build_run(cfg: Config) -> Run:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data)
    model = build_model(cfg, data.shape)
    count = 1 if cfg.train.schedule == "e2e" else cfg.parts.count
    parts = build_parts(cfg, model, count)
    return Run(cfg, data, model, parts, n_bins(data, cfg.data.n_bits))
