"""Single-device training: every schedule writes a full run directory, runs are reproducible,
``alternate`` trains one part per step, and training actually lowers the test bits/dim."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeflow.build import build_run
from pipeflow.config import with_overrides
from pipeflow.objective import bits_per_dim
from pipeflow.parts import whole_model_part
from support import metrics

# internals of the training core that issue 10's rewrite may rename or move
from pipeflow.loop import evaluate, train_step
from pipeflow.part_trainer import PartTrainer, optimizer_states
from pipeflow.schedules import active_parts
from pipeflow.train import make_phases, train

STEP_KEYS = {"phase", "part", "epoch", "step", "loss", "prefix_bpd", "images_per_s", "wall"}


@pytest.mark.parametrize("overrides", [
    ["train.schedule=e2e"],
    ["train.schedule=pipeline"],
    ["train.schedule=alternate", "train.alternate_every=0", "train.by_parts_epochs=2"],
    ["train.schedule=alternate", "train.alternate_every=1"],
    ["train.schedule=sequential", "train.by_parts_epochs=2"],
], ids=["e2e", "pipeline", "alternate-every-epoch", "alternate-every-step", "sequential"])
def test_every_schedule_writes_a_run_directory(tmp_path, tiny_config, overrides):
    cfg = with_overrides(tiny_config, overrides)
    out = tmp_path / "run"
    summary = train(cfg, out)
    t = cfg.train

    assert (out / "config.toml").read_text().startswith("[model]")
    assert (out / "model.pt").stat().st_size > 0
    pngs = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert len(pngs) == t.by_parts_epochs + t.finetune_epochs  # one grid per epoch
    assert all((out / "samples" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    on_disk = json.loads((out / "summary.json").read_text())
    assert math.isfinite(on_disk["test_bpd"]) and on_disk["test_bpd"] == pytest.approx(summary["test_bpd"])
    expected_phases = {"e2e": t.by_parts_epochs + t.finetune_epochs} if t.schedule == "e2e" else \
        {"by_parts": t.by_parts_epochs, "finetune": t.finetune_epochs}
    assert {k: v["epochs"] for k, v in on_disk["phases"].items()} == expected_phases
    # every phase took time, within the run's wall time (the phases are parts of the run, not estimates)
    assert all(v["seconds"] > 0 for v in on_disk["phases"].values())
    assert sum(v["seconds"] for v in on_disk["phases"].values()) <= on_disk["wall_seconds"]

    records = metrics(out)
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert steps and all(STEP_KEYS <= r.keys() for r in steps)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["prefix_bpd"]) for r in steps)
    assert len(evals) == t.by_parts_epochs + t.finetune_epochs
    assert evals[-1]["test_bpd"] == pytest.approx(on_disk["test_bpd"], abs=1e-5)

    by_parts = [(r["step"], r["part"]) for r in steps if r["phase"] == "by_parts"]
    n = t.steps_per_epoch
    if t.schedule == "pipeline":
        assert by_parts == [(s, k) for s in range(1, n + 1) for k in (0, 1)]
    elif t.schedule == "alternate" and t.alternate_every == 1:
        assert by_parts == [(s, (s - 1) % 2) for s in range(1, n + 1)]
    elif t.schedule == "alternate":  # one epoch per turn
        assert by_parts == [(s, (s - 1) // n) for s in range(1, 2 * n + 1)]
    elif t.schedule == "sequential":
        assert by_parts == [(s, (s - 1) // n) for s in range(1, 2 * n + 1)]
    else:
        assert by_parts == [] and {r["part"] for r in steps} == {0}


def test_log_every_samples_every_part(tmp_path, tiny_config):
    """Alternating every step with an even ``log_every`` must still log both parts' losses."""
    cfg = with_overrides(tiny_config, ["train.schedule=alternate", "train.alternate_every=1", "train.log_every=2",
                                       "train.steps_per_epoch=8", "train.samples=0"])
    train(cfg, tmp_path / "run")
    logged = [r["part"] for r in metrics(tmp_path / "run") if r["kind"] == "step" and r["phase"] == "by_parts"]
    assert sorted(set(logged)) == [0, 1] and len(logged) == 4  # 8 steps, 4 per part, every 2nd of each


def test_active_parts():
    assert active_parts("pipeline", 3, 0, 5, 10, 0) == [0, 1, 2]
    assert active_parts("e2e", 1, 4, 7, 10, 0) == [0]
    assert [active_parts("alternate", 3, 0, g, 10, 2)[0] for g in range(7)] == [0, 0, 1, 1, 2, 2, 0]
    assert [active_parts("alternate", 2, e, 99, 10, 0)[0] for e in range(4)] == [0, 1, 0, 1]
    assert [active_parts("sequential", 2, e, 0, 4, 0)[0] for e in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        active_parts("nonsense", 2, 0, 0, 1, 0)


def test_pipeline_run_is_bit_for_bit_reproducible(tmp_path, tiny_config):
    a = train(tiny_config, tmp_path / "a")
    b = train(tiny_config, tmp_path / "b")
    state_a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    state_b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a["test_bpd"] == b["test_bpd"]

    def comparable(out):
        return [{k: v for k, v in r.items() if k not in ("wall", "images_per_s", "train_seconds")}
                for r in metrics(out)]

    assert comparable(tmp_path / "a") == comparable(tmp_path / "b")
    # and a different seed gives a different model
    c = train(with_overrides(tiny_config, ["train.seed=1"]), tmp_path / "c")
    state_c = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert c["test_bpd"] != a["test_bpd"]


def test_alternate_step_trains_exactly_one_part(tiny_config):
    cfg = with_overrides(tiny_config, ["train.schedule=alternate", "train.alternate_every=1", "parts.count=3",
                                       "model.steps=3", "train.warmup_steps=0", "train.steps_per_epoch=0"])
    run = build_run(cfg)
    trainers = make_phases(run)[0].trainers
    assert len(trainers) == 3
    batches = run.train_batches().epoch(0)
    with torch.no_grad():  # the ActNorms' data-dependent init, as train() does it
        h = next(batches)
        for part in run.parts:
            h = part(h)[0]

    def snapshot():
        return [[p.detach().clone() for p in part.parameters()] for part in run.parts]

    for g in range(6):
        active = active_parts("alternate", 3, 0, g, 1, 1)
        assert active == [g % 3]
        before = snapshot()
        _, results = train_step(trainers, active, next(batches))
        assert [k for k, _, _ in results] == active
        after = snapshot()
        for k in range(3):
            changed = [not torch.equal(a, b) for a, b in zip(before[k], after[k])]
            if k == g % 3:
                assert any(changed), f"step {g}: part {k} did not train"
            else:
                assert not any(changed), f"step {g}: part {k} changed while part {g % 3} trained"


def test_training_lowers_test_bits_per_dim(tmp_path, tiny_config):
    cfg = with_overrides(tiny_config, ["train.schedule=e2e", "model.hidden=16", "train.samples=0",
                                       "train.warmup_steps=5", "train.steps_per_epoch=40"])
    untrained = train(with_overrides(cfg, ["train.by_parts_epochs=0", "train.finetune_epochs=0"]), tmp_path / "u")
    trained = train(with_overrides(cfg, ["train.by_parts_epochs=0", "train.finetune_epochs=1"]), tmp_path / "t")
    assert untrained["steps"] == 0 and trained["steps"] == 40
    assert trained["test_bpd"] < untrained["test_bpd"] - 0.3
    assert trained["test_bpd"] < math.log2(17)  # better than the uniform density on the 17 grey levels


def _after_one_more_step(tiny_config, fine_tune: str | None):
    """Train the 2 parts by parts (pipeline schedule) for 4 steps, then one more step: by parts
    again (``None``), or as the first step of fine-tuning the glued flow with a carried-over
    (``"carry"``) or a fresh (``"fresh"``) optimiser. Returns the run."""
    cfg = with_overrides(tiny_config, ["train.schedule=pipeline", "train.warmup_steps=2", "train.grad_clip=0",
                                       f"train.finetune_optimizer={fine_tune or 'carry'}"])
    run = build_run(cfg)
    by_parts, finetune = make_phases(run)
    batches = list(run.train_batches().epoch(0)) + list(run.train_batches().epoch(1))
    with torch.no_grad():
        run.model.initialize(batches[0])
    for x in batches[:4]:
        train_step(by_parts.trainers, [0, 1], x)
    if fine_tune is None:
        train_step(by_parts.trainers, [0, 1], batches[4])
    else:
        if fine_tune == "carry":
            assert finetune.trainers[0].carry_on_from(optimizer_states(by_parts.trainers)) > 0
        train_step(finetune.trainers, [0], batches[4])
    return run


def test_fine_tuning_warms_up_again_unless_every_parameter_carries_on(tiny_config):
    run = build_run(with_overrides(tiny_config, ["train.schedule=pipeline"]))
    by_parts, finetune = make_phases(run)
    with torch.no_grad():
        run.model.initialize(next(run.train_batches().epoch(0)))
    train_step(by_parts.trainers, [0], next(run.train_batches().epoch(0)))  # only part 0 has trained
    whole = finetune.trainers[0]
    assert 0 < whole.carry_on_from(optimizer_states(by_parts.trainers)) < len(whole.params)
    assert not whole.warm and whole.lr() < whole.base_lr
    train_step(by_parts.trainers, [0, 1], next(run.train_batches().epoch(0)))
    assert whole.carry_on_from(optimizer_states(by_parts.trainers)) == len(whole.params)
    assert whole.warm and whole.lr() == whole.base_lr


def test_fine_tuning_carries_the_parts_optimiser_on(tiny_config):
    """The last part's loss is the whole flow's up to terms it cannot change, so with the parts'
    Adam moments carried over, the first fine-tuning step moves it exactly as one more
    by-parts step would; a fresh optimiser (warmed up again) does not."""
    more = _after_one_more_step(tiny_config, None)
    carried = _after_one_more_step(tiny_config, "carry")
    fresh = _after_one_more_step(tiny_config, "fresh")

    def last_part(run):
        return torch.cat([p.detach().flatten() for p in run.parts[1].parameters()])

    def first_part(run):
        return torch.cat([p.detach().flatten() for p in run.parts[0].parameters()])

    torch.testing.assert_close(last_part(carried), last_part(more), rtol=0, atol=1e-6)
    assert (last_part(fresh) - last_part(more)).abs().max() > 1e-4
    # the first part now follows the whole flow's gradient, not its truncated objective's
    assert (first_part(carried) - first_part(more)).abs().max() > 1e-5


# --- the optimiser's settings, each observed in what the optimiser does ------------------------------


def test_warm_up_is_linear_in_each_optimisers_own_updates(tiny_config):
    cfg = with_overrides(tiny_config, ["train.schedule=e2e", "train.warmup_steps=4", "train.lr=1e-3"])
    run = build_run(cfg)
    (phase,) = make_phases(run)
    trainer = phase.trainers[0]
    x = next(run.train_batches().epoch(0))
    seen = []
    for _ in range(6):
        train_step([trainer], [0], x)
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_cosine_schedule_decays_every_rate_over_the_whole_run(tmp_path, tiny_config):
    """train.lr_schedule = "cosine": one curve over the run's steps, whatever the phase or part: alternate
    by parts (3 epochs, each part trains every other step) then fine-tuning at its own base rate (1 epoch),
    every update on the curve at its step, 12 steps in all. The warm-up still multiplies it."""
    cfg = with_overrides(tiny_config, ["train.schedule=alternate", "train.by_parts_epochs=3", "train.lr=1e-3",
                                       "train.finetune_lr=4e-4", "train.lr_schedule=cosine", "train.warmup_steps=2",
                                       "train.samples=0"])
    train(cfg, tmp_path / "run")
    steps = [r for r in metrics(tmp_path / "run") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    updates = {0: 0, 1: 0, "whole": 0}
    for r in steps:
        who = "whole" if r["phase"] == "finetune" else r["part"]
        updates[who] += 1
        base = 4e-4 if who == "whole" else 1e-3
        warm = 1.0 if who == "whole" else min(1.0, updates[who] / 2)  # fine-tuning carries on: no warm-up
        assert r["lr"] == pytest.approx(base * warm * (1 + math.cos(math.pi * (r["step"] - 1) / 12)) / 2, rel=1e-12)
    assert steps[-1]["lr"] < 1e-5


def test_gradients_are_clipped_to_grad_clip(tiny_config):
    x = None
    for clip in (0.0, 1e-3):
        cfg = with_overrides(tiny_config, ["train.schedule=e2e", f"train.grad_clip={clip}"])
        run = build_run(cfg)
        (phase,) = make_phases(run)
        x = next(run.train_batches().epoch(0)) if x is None else x
        train_step(phase.trainers, [0], x)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in phase.trainers[0].params]))
        if clip:
            assert norm == pytest.approx(clip, rel=1e-4)  # what the update used
        else:
            assert norm > 100 * 1e-3  # unclipped, far above the clip tried next


def test_adamax_is_used_when_asked(tiny_config):
    run = build_run(with_overrides(tiny_config, ["train.optimizer=adamax"]))
    by_parts, finetune = make_phases(run)
    x = next(run.train_batches().epoch(0))
    train_step(by_parts.trainers, [0, 1], x)
    for trainer in [*by_parts.trainers, *finetune.trainers]:
        assert isinstance(trainer.optimizer, torch.optim.Adamax)
    state = by_parts.trainers[0].optimizer.state[by_parts.trainers[0].params[0]]
    assert "exp_inf" in state and "exp_avg_sq" not in state  # Adamax's infinity norm, not Adam's


def test_part_and_finetune_learning_rates_reach_their_optimisers(tiny_config):
    # standard prior: the flow head's ActNorm initialises from the data in the first step, a far larger move
    cfg = with_overrides(tiny_config, ["train.schedule=pipeline", "train.warmup_steps=0",
                                       "parts.boundary_prior=standard", "train.part_lrs=[1e-3, 1e-5]",
                                       "train.finetune_lr=2e-4"])
    run = build_run(cfg)
    by_parts, finetune = make_phases(run)
    with torch.no_grad():
        run.model.initialize(next(run.train_batches().epoch(0)))

    def largest_move(trainers, step):
        before = [p.detach().clone() for tr in trainers for p in tr.params]
        step()
        return [max((p - q).abs().max().item() for p, q in zip(tr.params, before[i:]))
                for i, tr in zip((0, len(trainers[0].params)), trainers)]

    x = next(run.train_batches().epoch(1))
    # Adam's first update moves each parameter by its learning rate (times the sign of its gradient)
    moved = largest_move(by_parts.trainers, lambda: train_step(by_parts.trainers, [0, 1], x))
    assert moved == pytest.approx([1e-3, 1e-5], rel=2e-2)  # (float32 parameters near 1 round a 1e-5 step)
    cfg_fresh = with_overrides(cfg, ["train.finetune_optimizer=fresh"])
    run = build_run(cfg_fresh)
    _, finetune = make_phases(run)
    with torch.no_grad():
        run.model.initialize(next(run.train_batches().epoch(0)))
    (moved,) = largest_move(finetune.trainers, lambda: train_step(finetune.trainers, [0], x))
    assert moved == pytest.approx(2e-4, rel=1e-3)


def test_test_bits_per_dim_weighs_every_image_of_every_batch(tiny_config):
    """70 test images in batches of 16 (the last one of 6): the mean over images, not batches."""
    cfg = with_overrides(tiny_config, ["data.test_limit=70", "train.eval_batch_size=16"])
    run = build_run(cfg)
    run.model.initialize(next(run.train_batches().epoch(0)))
    trainer = PartTrainer(whole_model_part(run.model), 1.0, cfg.train, run.num_dims, run.n_bins)
    batches = list(run.test_batches().epoch(0))
    assert [len(b) for b in batches] == [16, 16, 16, 16, 6]
    with torch.no_grad():
        direct = torch.cat([bits_per_dim(run.model.log_prob(b), run.num_dims, run.n_bins) for b in batches])
    assert evaluate([trainer], run.test_batches(), torch.device("cpu"))[-1] == pytest.approx(direct.mean().item(),
                                                                                            rel=1e-6)
