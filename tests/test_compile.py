"""train.compile: a compiled part trains as the eager one does.

The compiled and eager steps are the same arithmetic in another order, so they agree to
float32 rounding, not bit for bit: losses within a relative 1e-5, gradients and parameters
within 1e-4 of their largest magnitude (the observed gaps are about 1e-7 and 1e-6). The ActNorm
initialisation runs eagerly in both, so it agrees exactly. One compilation of a one-level,
one-step Glow: some 20-40 s on this machine's shared cores (less with a warm inductor cache).
"""

from __future__ import annotations

import torch

from pipeflow.build import build_model
from pipeflow.config import from_dict
from pipeflow.glow.actnorm import ActNorm
from pipeflow.parts import whole_model_part
import pytest

from support import MULTIRANK, metrics, ok, summary, tiny, torchrun, write_config

from pipeflow.part_trainer import PartTrainer

SMALLEST = {"model.levels": 1, "model.steps": 1, "model.hidden": 8, "parts.count": 1, "train.warmup_steps": 0}


def _trainer(compile_: bool) -> tuple[PartTrainer, list[list[torch.Tensor]]]:
    """A whole-model trainer of the seeded tiny Glow, and the gradients of each of its steps (as the hook sees them)."""
    cfg = from_dict(tiny(SMALLEST, {"train.compile": compile_}))
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8))
    grads: list[list[torch.Tensor]] = []
    trainer = PartTrainer(whole_model_part(model), 1e-3, cfg.train, 64, 17,
                          grad_hook=lambda gs: grads.append([g.clone() for g in gs]))
    return trainer, grads


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= rel * max(float(b.abs().max()), 1e-6))


def _actnorms(trainer: PartTrainer) -> list[torch.Tensor]:
    return [t.detach().clone() for m in trainer.part.modules() if isinstance(m, ActNorm)
            for t in (m.bias, m.log_scale)]


def test_compiled_steps_agree_with_eager_ones():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(16, 1, 8, 8, generator=g) for _ in range(4)]
    (eager, eager_grads), (compiled, compiled_grads) = _trainer(False), _trainer(True)

    zero = torch.zeros(16)
    for tr in (eager, compiled):  # the loop's INIT message: the data-dependent initialisation
        tr.forward(batches[0], zero)
    assert all(torch.equal(a, b) for a, b in zip(_actnorms(eager), _actnorms(compiled)))
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in _actnorms(compiled))

    for x in batches[1:]:
        (_, loss_e, _), (_, loss_c, _) = eager.train_step(x, zero), compiled.train_step(x, zero)
        assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e)
    for step_e, step_c in zip(eager_grads, compiled_grads, strict=True):
        assert all(_close(gc, ge) for gc, ge in zip(step_c, step_e, strict=True))
    for pc, pe in zip(compiled.part.parameters(), eager.part.parameters(), strict=True):
        assert _close(pc, pe)

    # the steps after the first did run compiled, as one graph with no break at ActNorm's flag
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    # evaluation stays eager and sees the compiled run's parameters
    out_e, out_c = eager.forward(batches[0], zero), compiled.forward(batches[0], zero)
    assert _close(out_c.prefix_bpd, out_e.prefix_bpd)


def test_compiled_pipelined_finetuning_trains_as_the_eager_one_does(tmp_path):
    """train.compile on 2 ranks: by parts (PartTrainer, as above), then pipelined fine-tuning with each stage's
    likelihood compiled. Rounding differences grow over the run's 10 Adam steps (a zero-initialised layer's
    update is about lr times the sign of a tiny gradient), so the check is on what the run reports: every
    fine-tuning loss and the final test bits/dim within 1e-4 bits/dim of the eager run's."""
    config = write_config(tmp_path, MULTIRANK, SMALLEST, {"parts.count": 2, "parts.scheme": "across",
                                                          "train.by_parts_epochs": 1, "train.finetune_epochs": 1,
                                                          "distributed.finetune": "pipeline", "model.steps": 2,
                                                          "parts.boundary_prior": "standard"})
    ok(torchrun(2, config, tmp_path / "eager"))
    ok(torchrun(2, config, tmp_path / "compiled", "--set", "train.compile=true", timeout=600))

    def finetune_losses(run):
        return [r["loss"] for r in metrics(run) if r["kind"] == "step" and r["phase"] == "finetune"]

    eager, compiled = finetune_losses(tmp_path / "eager"), finetune_losses(tmp_path / "compiled")
    assert len(compiled) == 5 and compiled == pytest.approx(eager, abs=1e-4)
    test_bpd = {run: summary(tmp_path / run)["test_bpd"] for run in ("eager", "compiled")}
    assert test_bpd["compiled"] == pytest.approx(test_bpd["eager"], abs=1e-4)
