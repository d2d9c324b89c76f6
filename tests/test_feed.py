"""train.feed_ema: part k+1 trains on the output of an average of part k's weights; off changes nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeflow.build import build_run
from pipeflow.config import with_overrides
from pipeflow.errors import UserError
from pipeflow.loop import train_step
from pipeflow.objective import PartLikelihood, part_objective
from pipeflow.train import make_phases, train

STEPS = 3  # the tiny config's steps per epoch


def _batches(run):
    return [x for _, x in zip(range(STEPS), run.train_batches().epoch(0))]


def _trainers(tiny_config, decay, schedule="pipeline"):
    run = build_run(with_overrides(tiny_config, [f"train.schedule={schedule}", f"train.feed_ema={decay}"]))
    trainers = make_phases(run)[0].trainers
    with torch.no_grad():
        run.model.initialize(_batches(run)[0])
    return run, trainers


def test_off_is_each_part_on_the_output_of_the_one_before(tiny_config):
    """feed_ema = 0 trains exactly as before: part 2 on part 1's own updated output, bit for bit."""
    run, trainers = _trainers(tiny_config, 0.0)
    assert all(tr.feed is None for tr in trainers)
    reference = copy.deepcopy(trainers)  # the same parts and optimisers, driven by hand below
    for x in _batches(run):
        train_step(trainers, [0, 1], x)
        out, _, _ = reference[0].train_step(x, torch.zeros(len(x)))
        reference[1].train_step(out.h, out.carry)
    for mine, theirs in zip(trainers, reference):
        for a, b in zip(mine.part.parameters(), theirs.part.parameters(), strict=True):
            assert torch.equal(a, b)


def test_the_next_part_trains_on_the_averaged_weights(tiny_config):
    decay = 0.5
    run, trainers = _trainers(tiny_config, decay)
    first, last = trainers
    assert first.feed is not None and last.feed is None  # the last part feeds no one
    seen, live, expected = [], [], None
    train_last = last.train_step

    def spy(h, carry):
        seen.append(h.clone())
        return train_last(h, carry)

    last.train_step = spy
    for n, x in enumerate(_batches(run)):
        train_step(trainers, [0, 1], x)
        weights = [p.detach().clone() for p in first.part.parameters()]
        if expected is None:
            expected = weights
        else:
            d = min(decay, (1 + n) / (10 + n))  # the ramp, n updates averaged so far
            expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
        live.append(weights)
        with torch.no_grad():
            averaged = part_objective(PartLikelihood(first.feed.average), x, torch.zeros(len(x)), run.num_dims,
                                      run.n_bins).h
            own = first.forward(x, torch.zeros(len(x))).h
        torch.testing.assert_close(seen[-1], averaged, rtol=0, atol=0)
        if n > 0:
            assert not torch.allclose(seen[-1], own)  # not the part's own output
    for avg, e in zip(first.feed.average.parameters(), expected, strict=True):
        torch.testing.assert_close(avg, e)
    assert first.feed.updates == STEPS


def test_alternate_hands_on_the_average_to_the_part_in_turn(tiny_config):
    run, trainers = _trainers(tiny_config, 0.9, schedule="alternate")
    x0, x_, x1 = _batches(run)
    train_step(trainers, [0], x0)  # part 1's turn: its first update starts its average (a copy) ...
    train_step(trainers, [0], x_)  # ... its second moves the average part of the way
    with torch.no_grad():
        averaged = part_objective(PartLikelihood(trainers[0].feed.average), x1, torch.zeros(len(x1)), run.num_dims,
                                  run.n_bins)
        own = trainers[0].forward(x1, torch.zeros(len(x1)))
        expected = part_objective(PartLikelihood(trainers[1].part), averaged.h, averaged.carry, run.num_dims,
                                  run.n_bins)
        not_expected = part_objective(PartLikelihood(trainers[1].part), own.h, own.carry, run.num_dims, run.n_bins)
    _, results = train_step(trainers, [1], x1)  # part 2's turn: part 1 runs forward as its average
    assert [k for k, _, _ in results] == [1]
    assert results[0][1] == pytest.approx(expected.loss.item(), rel=1e-6)
    assert results[0][1] != pytest.approx(not_expected.loss.item(), rel=1e-6)


def test_the_average_is_saved_and_restored_with_its_trainer(tiny_config):
    run, trainers = _trainers(tiny_config, 0.9)
    for x in _batches(run):
        train_step(trainers, [0, 1], x)
    state = copy.deepcopy(trainers[0].state_dict())
    _, fresh = _trainers(tiny_config, 0.9)
    fresh[0].load_state_dict(state)
    assert fresh[0].feed.updates == STEPS
    for a, b in zip(fresh[0].feed.average.state_dict().values(), trainers[0].feed.average.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_with_an_averaged_feed_finishes(tmp_path, tiny_config):
    summary = train(with_overrides(tiny_config, ["train.feed_ema=0.99", "train.samples=0"]), tmp_path / "run")
    assert math.isfinite(summary["test_bpd"])


@pytest.mark.parametrize("overrides, words", [
    (["train.feed_ema=1.0"], "must be in [0, 1)"),
    (["train.feed_ema=0.9", "train.schedule=sequential", "train.by_parts_epochs=2"], "not 'sequential'"),
])
def test_bad_feed_ema_is_refused(tiny_config, overrides, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        with_overrides(tiny_config, overrides)


def test_a_part_that_only_feeds_the_next_never_runs_its_prior(tiny_config):
    """Forward only, a part's output and carried terms are all the next part needs: its boundary prior (the
    flow head: two flow steps) runs neither in alternate's forward pass nor in the averaged feed's."""
    run, trainers = _trainers(with_overrides(tiny_config, ["parts.boundary_prior=flow"]), 0.9, schedule="alternate")
    x0, x1, x2 = _batches(run)
    zeros = torch.zeros(len(x2))
    own = trainers[0].forward(x2, zeros)  # with its prior, as evaluation runs it
    prior, calls = trainers[0].part.prior, []
    log_prob = prior.log_prob
    prior.log_prob = lambda h: calls.append(len(h)) or log_prob(h)
    handed = trainers[0].hand_on(x2, zeros)
    assert torch.equal(handed.h, own.h) and torch.equal(handed.carry, own.carry) and calls == []
    train_step(trainers, [0], x0)  # part 1's turn: its own loss needs its prior, once
    assert calls == [len(x0)]
    train_step(trainers, [1], x1)  # part 2's turn: part 1's average runs forward only
    assert calls == [len(x0)] and trainers[0].feed.average is not None
