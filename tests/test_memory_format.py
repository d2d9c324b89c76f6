"""train.channels_last: the same flow, its convolutions in NHWC.

The layout changes which kernels run, not the arithmetic, so a part trains as the contiguous one
does to float32 rounding (parameters about 3e-6 apart after 4 steps). On ranks, NHWC tensors travel:
a stage's latents, the gathered parameters and optimiser moments, DDP's gradients.
"""

from __future__ import annotations

import pytest
import torch

from pipeflow.build import build_model, build_parts
from pipeflow.config import from_dict
from pipeflow.glow.coupling import CouplingNet
from pipeflow.part_trainer import PartTrainer

from support import (MULTIRANK, max_difference, in_process, model_state, ok, ranks_of_script, summary, tiny, torchrun,
                     write_config)

TWO_PARTS = {"model.levels": 2, "model.steps": 2, "model.hidden": 8, "parts.count": 2, "parts.scheme": "across",
             "parts.boundary_prior": "flow", "train.warmup_steps": 0}


def _trainers(channels_last: bool) -> list[PartTrainer]:
    cfg = from_dict(tiny(TWO_PARTS, {"train.channels_last": channels_last}))
    model = build_model(cfg, (1, 8, 8))
    return [PartTrainer(part, 1e-3, cfg.train, 64, 17) for part in build_parts(cfg, model)]


def _weights(trainers: list[PartTrainer]) -> list[torch.Tensor]:
    """Every 4-d parameter: the model's convolutions and ActNorms, and the flow head's."""
    return [p for tr in trainers for p in tr.part.parameters() if p.dim() == 4]


def _train(trainers: list[PartTrainer], batches: list[torch.Tensor]) -> list[float]:
    """Both parts on every batch, the second on the first's output; the losses."""
    losses = []
    for x in batches:  # the first step starts the ActNorms on its batch
        h, carry = x, torch.zeros(len(x))
        for trainer in trainers:
            out, loss, _ = trainer.train_step(h, carry)
            h, carry = out.h, out.carry
            losses.append(loss)
    return losses


def test_channels_last_parts_train_as_contiguous_ones_do():
    plain, nhwc = _trainers(False), _trainers(True)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _weights(nhwc))
    changed = [w for w in _weights(nhwc) if not w.is_contiguous()]  # 3x3 kernels; 1x1 ones are both
    assert len(changed) >= 8 and all(w.is_contiguous() for w in _weights(plain))

    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(16, 1, 8, 8, generator=g) for _ in range(4)]
    layouts = []  # of what a coupling network's hidden convolution hands on, in the NHWC flow
    conv = next(m for m in nhwc[0].part.modules() if isinstance(m, CouplingNet)).conv2
    conv.register_forward_hook(lambda module, args, out: layouts.append(
        out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    losses_plain, losses_nhwc = _train(plain, batches), _train(nhwc, batches)
    assert losses_nhwc == pytest.approx(losses_plain, rel=1e-5) and len(losses_nhwc) == 8
    # Adam moves a parameter by about lr (1e-3) a step whatever its gradient's size, so a rounding-level
    # gradient of a zero-initialised layer can move it by that much: the parameters agree far inside it
    gaps = [float((a - b).detach().abs().max()) for a, b in zip(_weights(plain), _weights(nhwc), strict=True)]
    assert max(gaps) <= 1e-4
    assert layouts and all(layouts)  # the activations follow the weights, with no conversion asked for


def test_channels_last_on_ranks_ends_where_one_device_does(tmp_path):
    """By parts on 2 ranks (flow heads), gathered, fine-tuned with DDP: one device's run, to rounding."""
    config = write_config(tmp_path, MULTIRANK, {"train.by_parts_epochs": 1, "train.finetune_epochs": 1,
                                                "parts.boundary_prior": "flow", "train.channels_last": True})
    ok(torchrun(2, config, tmp_path / "ranks"))
    in_process("train", "--config", config, "--out", tmp_path / "single", "--quiet")
    assert max_difference(tmp_path / "ranks", tmp_path / "single") < 1e-3
    kernels = [t for t in model_state(tmp_path / "ranks").values() if t.dim() == 4 and t.shape[-1] == 3]
    assert kernels and all(t.is_contiguous(memory_format=torch.channels_last) for t in kernels)  # as trained
    assert summary(tmp_path / "ranks")["test_bpd"] == pytest.approx(summary(tmp_path / "single")["test_bpd"], abs=1e-3)


BROADCAST = """
import json, sys
import torch, torch.distributed as dist
from pipeflow.distributed.collectives import broadcast_tensors

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
mine = value.clone() if rank == 0 else torch.zeros_like(value).contiguous(memory_format=torch.channels_last)
broadcast_tensors([mine], src=0)
json.dump({"equal": torch.equal(mine, value), "layout_kept": mine.is_contiguous() == (rank == 0)},
          open(sys.argv[1] + str(rank), "w"))
dist.destroy_process_group()
"""


def test_a_tensor_broadcast_between_layouts_keeps_its_elements(tmp_path):
    """Rank 0 holds NCHW, rank 1 NHWC (a resumed run whose layout changed): rank 1 gets the same tensor."""
    assert ranks_of_script(BROADCAST, tmp_path) == [{"equal": True, "layout_kept": True}] * 2
