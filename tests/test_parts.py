"""Cutting a Glow into parts: the schemes, the composition identity, the prefix flows, gradient isolation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from conftest import make_glow

from pipeflow.tools.balance import balanced_cuts
from pipeflow.errors import UserError
from pipeflow.glow import Glow
from pipeflow.glow.model import flow_forward
from pipeflow.objective import PartLikelihood, bits_per_dim, part_objective
from pipeflow.parts import cut_points, split_into_parts

N_BINS = 17
D = 64


def _steps(parts):
    return [(p.steps.start, p.steps.stop) for p in parts]


def _x(n=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64) - 0.5


# --- schemes ---------------------------------------------------------------------------------------


def test_scheme_blocks():
    model = Glow(1, 8, levels=3, steps=4, hidden=4)
    assert _steps(split_into_parts(model, "blocks", 2)) == [(0, 4), (4, 12)]
    assert _steps(split_into_parts(model, "blocks", 3)) == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(UserError):
        split_into_parts(model, "blocks", 4)


def test_scheme_across_is_the_papers():
    """2 parts: 1/2 | 1/2, 2, 3 levels;  3 parts: 1/2 | 1/2 .. 3/2 | the rest."""
    K = 4
    model = Glow(1, 8, levels=3, steps=K, hidden=4)
    assert _steps(split_into_parts(model, "across", 2)) == [(0, K // 2), (K // 2, 3 * K)]
    assert _steps(split_into_parts(model, "across", 3)) == [(0, K // 2), (K // 2, K + K // 2), (K + K // 2, 3 * K)]
    with pytest.raises(UserError):
        split_into_parts(Glow(1, 8, levels=3, steps=1, hidden=4), "across", 2)  # cannot cut inside a level
    with pytest.raises(UserError):
        split_into_parts(model, "across", 5)


def test_scheme_cuts():
    model = Glow(1, 8, levels=2, steps=3, hidden=4)
    assert _steps(split_into_parts(model, "cuts", 3, cuts=[5, 2])) == [(0, 2), (2, 5), (5, 6)]
    for bad in ([2], [2, 2], [0, 3], [3, 6]):
        with pytest.raises(UserError):
            split_into_parts(model, "cuts", 3, cuts=bad)
    with pytest.raises(UserError):
        split_into_parts(model, "nonsense", 2)
    with pytest.raises(UserError):
        split_into_parts(model, "cuts", 7, cuts=list(range(1, 7)))  # more parts than steps


def test_parts_cover_the_model_exactly_once():
    model = Glow(1, 8, levels=3, steps=4, hidden=4)
    for scheme, count in [("blocks", 3), ("across", 2), ("across", 4), ("cuts", 2)]:
        parts = split_into_parts(model, scheme, count, cuts=[7])
        layers = [layer for p in parts for layer in p.layers]
        assert len(layers) == len(model.layers)
        assert all(a is b for a, b in zip(layers, model.layers))  # shared, not copied
        assert parts[-1].prior is model.top_prior
        for a, b in zip(parts, parts[1:]):
            assert a.out_shape == b.in_shape


def _max_part_cost(costs, cuts):
    bounds = [0, *cuts, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(6))
def test_balanced_cuts_minimise_the_costliest_part(seed):
    rng = random.Random(seed)
    n = rng.randint(4, 10)
    costs = [rng.uniform(0.1, 10.0) for _ in range(n)]
    for parts in range(1, min(n, 4) + 1):
        cuts = balanced_cuts(costs, parts)
        assert len(cuts) == parts - 1 and cuts == sorted(set(cuts)) and all(0 < c < n for c in cuts)
        brute = min(_max_part_cost(costs, list(c)) for c in itertools.combinations(range(1, n), parts - 1))
        assert math.isclose(_max_part_cost(costs, cuts), brute, rel_tol=1e-12)


def test_balanced_scheme_uses_the_step_costs():
    model = Glow(1, 8, levels=2, steps=3, hidden=4)
    costs = [1.0, 1.0, 1.0, 1.0, 1.0, 10.0]
    assert cut_points(model, "balanced", 2, step_costs=costs) == [5]
    with pytest.raises(UserError):
        cut_points(model, "balanced", 2)  # no costs


# --- the composition identity and the prefix flows -------------------------------------------------


@pytest.fixture(params=[("across", 3), ("blocks", 2), ("cuts", 4)])
def model_and_parts(request):
    scheme, count = request.param
    model = make_glow(levels=3, steps=2, seed=count)
    with torch.no_grad():
        model.top_prior.mean.normal_(0, 0.1)
        model.top_prior.log_std.normal_(0, 0.1)
    return model, split_into_parts(model, scheme, count, cuts=[1, 2, 5])


def test_composition_identity(model_and_parts):
    model, parts = model_and_parts
    x = _x()
    h, total = x, torch.zeros(len(x), dtype=torch.float64)
    for part in parts:
        h, logdet, logp_factored = part(h)
        total = total + logdet + logp_factored
    total = total + parts[-1].prior.log_prob(h)
    torch.testing.assert_close(total, model.log_prob(x), rtol=1e-10, atol=1e-9)


def test_carry_gives_the_models_bits_per_dim(model_and_parts):
    model, parts = model_and_parts
    x = _x()
    h, carry = x, torch.zeros(len(x), dtype=torch.float64)
    for part in parts:
        out = part_objective(PartLikelihood(part), h, carry, D, N_BINS)
        h, carry = out.h, out.carry
    expected = bits_per_dim(model.log_prob(x), D, N_BINS)
    torch.testing.assert_close(out.prefix_bpd, expected.detach(), rtol=1e-10, atol=1e-10)


def test_prefix_bpd_is_that_of_the_shallower_flow(model_and_parts):
    """Part k's prefix bpd is the exact bits/dim of the flow f_k o ... o f_1 with prior N(0, I)."""
    model, parts = model_and_parts
    x = _x()
    h, carry = x, torch.zeros(len(x), dtype=torch.float64)
    stop = 0
    for part in parts[:-1]:
        out = part_objective(PartLikelihood(part), h, carry, D, N_BINS)
        h, carry = out.h, out.carry
        stop += len(part.layers)
        h_direct, _, logdet, logp_factored = flow_forward(model.layers[:stop], x)
        standard = torch.distributions.Normal(0.0, 1.0).log_prob(h_direct).flatten(1).sum(1)
        expected = bits_per_dim(standard + logdet + logp_factored, D, N_BINS)
        torch.testing.assert_close(out.prefix_bpd, expected.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("boundary_prior", ["standard", "learned"])
def test_gradient_isolation(boundary_prior):
    model = make_glow(levels=3, steps=2, seed=11)
    parts = split_into_parts(model, "across", 3, boundary_prior=boundary_prior)
    if boundary_prior == "learned":
        with torch.no_grad():
            for p in parts[:-1]:
                p.prior.mean.normal_(0, 0.1)
    x = _x()
    for k in range(len(parts)):
        model.zero_grad(set_to_none=True)
        for p in parts:
            p.zero_grad(set_to_none=True)
        h, carry, outs = x, torch.zeros(len(x), dtype=torch.float64), []
        for part in parts:
            out = part_objective(PartLikelihood(part), h, carry, D, N_BINS)
            outs.append(out)
            h, carry = out.h, out.carry  # not detached here: part_objective must cut the graph itself
        outs[k].loss.backward()
        for j, part in enumerate(parts):
            for name, p in part.named_parameters():
                if j == k:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"part {k} parameter {name} got no gradient"
                else:
                    assert p.grad is None or not p.grad.any(), f"part {k}'s loss reached part {j}'s {name}"
    own = [sum(1 for _ in p.parameters()) for p in parts]
    assert all(own) and sum(own) == sum(1 for _ in model.parameters()) + (2 * 2 if boundary_prior == "learned" else 0)
