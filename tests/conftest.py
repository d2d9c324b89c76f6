"""Shared tiny fixtures: a small float64 Glow, and the tiny config of support.py as a file and as a Config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeflow.glow import Glow
from support import CHECKPOINTED, Crash, crash_after, write_config

# The models here are tiny: one intra-op thread is as fast as two, and far faster when the
# machine's cores are busy with something else (spinning OpenMP threads then fight for them).
torch.set_num_threads(1)


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
    return write_config(tmp_path)


@pytest.fixture
def tiny_config(tiny_config_path: Path):
    from pipeflow.config import load_config

    return load_config(tiny_config_path)


# --- one run checkpointed every 2 steps, finished and interrupted, shared by the tests of resuming ---


@pytest.fixture(scope="session")
def checkpointed_config_path(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("checkpointed"), CHECKPOINTED)


@pytest.fixture(scope="session")
def checkpointed_cfg(checkpointed_config_path):
    from pipeflow.config import load_config

    return load_config(checkpointed_config_path)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, checkpointed_cfg) -> Path:
    """The checkpointed run, uninterrupted (9 steps: 2 epochs by parts, 1 of fine-tuning)."""
    from pipeflow.train import train

    out = tmp_path_factory.mktemp("reference") / "run"
    train(checkpointed_cfg, out)
    return out


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory, checkpointed_cfg) -> Path:
    """The checkpointed run, killed after step 5 (its newest checkpoint: step 4)."""
    from pipeflow.train import train

    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(Crash):
        train(checkpointed_cfg, out, after_step=crash_after(5))
    return out
