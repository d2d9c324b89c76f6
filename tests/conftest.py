"""Shared tiny fixtures: a small float64 Glow, and a tiny TOML config for training and CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeflow.glow import Glow

# The models here are tiny: one intra-op thread is as fast as two, and far faster when the
# machine's cores are busy with something else (spinning OpenMP threads then fight for them).
torch.set_num_threads(1)

# Small enough that a whole train -> eval -> sample round trip takes a few seconds on 2 cores.
TINY_TOML = """\
[model]
levels = 2
steps = 2
hidden = 8

[data]
dataset = "digits"
test_limit = 64

[parts]
count = 2
scheme = "across"

[train]
schedule = "pipeline"
by_parts_epochs = 1
finetune_epochs = 1
batch_size = 16
eval_batch_size = 64
lr = 1e-3
warmup_steps = 2
steps_per_epoch = 3
log_every = 1
samples = 4
seed = 0
"""


def make_glow(in_channels: int = 1, image_size: int = 8, levels: int = 2, steps: int = 2, hidden: int = 8,
              coupling: str = "affine", lu: bool = True, seed: int = 0, init_batch: int = 16) -> Glow:
    """A float64 Glow whose ActNorms are initialised and whose zero-initialised convolutions are perturbed.

    Perturbing the zero convolutions makes every coupling and split prior a non-trivial function, so
    tests of log-dets and log-probs are not passed by an identity map.
    """
    torch.manual_seed(seed)
    model = Glow(in_channels, image_size, levels, steps, hidden, coupling, lu).double()
    model.initialize(torch.rand(init_batch, in_channels, image_size, image_size, dtype=torch.float64) - 0.5)
    perturb_zero_convs(model, seed)
    return model


@torch.no_grad()
def perturb_zero_convs(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every zero-initialised output convolution (couplings, split priors) small random weights."""
    from pipeflow.glow.coupling import ZeroConv2d

    gen = torch.Generator().manual_seed(seed + 12345)
    for m in module.modules():
        if isinstance(m, ZeroConv2d):
            for p in (m.conv.weight, m.conv.bias, m.log_scale):
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


@pytest.fixture
def glow() -> Glow:
    return make_glow()


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture
def tiny_config(tiny_config_path: Path):
    from pipeflow.config import load_config

    return load_config(tiny_config_path)
