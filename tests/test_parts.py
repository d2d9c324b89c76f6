"""Cutting a Glow into parts: the schemes, the composition identity, the prefix flows, gradient isolation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from conftest import make_glow, perturb_zero_convs
from support import tiny
from torch.nn import functional as F

from pipeflow.tools.balance import balanced_cuts
from pipeflow.errors import UserError
from pipeflow.glow import Glow
from pipeflow.glow.model import flow_forward
from pipeflow.objective import PartLikelihood, bits_per_dim, part_objective
from pipeflow.config import BOUNDARY_PRIORS
from pipeflow.glow.gaussian import LearnedGaussian, StandardNormal
from pipeflow.parts import cut_points, split_into_parts, whole_model_part
from pipeflow.priors import ConditionalGaussian, FlowPrior, boundary_prior

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


def _max_part_cost(costs, cuts, ends=None):
    """The costliest part's cost; ``ends[b]`` is added to a part that ends after b steps, but the last."""
    bounds = [0, *cuts, len(costs)]
    return max(sum(costs[a:b]) + (ends[b] if ends and b < len(costs) else 0.0) for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_ends", [False, True], ids=["steps", "steps+boundaries"])
def test_balanced_cuts_minimise_the_costliest_part(seed, with_ends):
    rng = random.Random(seed)
    n = rng.randint(4, 10)
    costs = [rng.uniform(0.1, 10.0) for _ in range(n)]
    ends = [rng.uniform(0.0, 10.0) for _ in range(n + 1)] if with_ends else None
    for parts in range(1, min(n, 4) + 1):
        cuts = balanced_cuts(costs, parts, ends or ())
        assert len(cuts) == parts - 1 and cuts == sorted(set(cuts)) and all(0 < c < n for c in cuts)
        brute = min(_max_part_cost(costs, list(c), ends) for c in itertools.combinations(range(1, n), parts - 1))
        assert math.isclose(_max_part_cost(costs, cuts, ends), brute, rel_tol=1e-12)
    with pytest.raises(UserError, match="one per cut point"):
        balanced_cuts(costs, 2, [1.0] * n)


def test_the_balanced_scheme_counts_the_flow_heads_and_builds_what_the_same_cuts_build():
    """At width 16 a ``flow`` head costs two flow steps, so the first part's cut moves to balance it;
    counting it builds no weights the run would not have (the same model and priors as those cuts given)."""
    from pipeflow.build import build_model, build_parts
    from pipeflow.config import from_dict
    from pipeflow.tools.flops import part_flops, step_flops

    settings = {"model.levels": 2, "model.steps": 4, "model.hidden": 16, "parts.count": 2,
                "parts.scheme": "balanced", "parts.boundary_prior": "flow"}
    cfg = from_dict(tiny(settings))
    model = build_model(cfg, (1, 28, 28))
    balanced = build_parts(cfg, model)
    costliest = {c: max(part_flops(model, split_into_parts(model, "cuts", 2, [c], "flow")))
                 for c in range(1, model.num_steps)}
    assert balanced[1].steps.start == min(costliest, key=costliest.get) == 2  # the steps alone: a cut at 3
    assert cut_points(model, "balanced", 2, step_costs=step_flops(model)) == [3]
    given = from_dict(tiny(settings, {"parts.scheme": "cuts", "parts.cuts": [2]}))
    same_model = build_model(given, (1, 28, 28))
    same_head = build_parts(given, same_model)[0].prior
    for a, b in ((model, same_model), (balanced[0].prior, same_head)):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(x, b.state_dict()[name]) for name, x in a.state_dict().items())


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


@pytest.mark.parametrize("boundary_prior", BOUNDARY_PRIORS)
@pytest.mark.parametrize("scheme, count", [("across", 3), ("blocks", 2), ("cuts", 4)])
def test_prefix_bpd_is_that_of_the_shallower_flow(scheme, count, boundary_prior):
    """Part k's prefix bpd is the exact bits/dim of the flow f_k o ... o f_1 with its boundary prior."""
    model = make_glow(levels=3, steps=2, seed=count)
    parts = split_into_parts(model, scheme, count, cuts=[1, 2, 5], boundary_prior=boundary_prior)
    for part in parts[:-1]:
        part.prior.double()
        _perturb_prior(part.prior, seed=part.index)
    x = _x()
    h, carry = x, torch.zeros(len(x), dtype=torch.float64)
    stop = 0
    for part in parts[:-1]:
        out = part_objective(PartLikelihood(part), h, carry, D, N_BINS)
        h, carry = out.h, out.carry
        stop += len(part.layers)
        h_direct, _, logdet, logp_factored = flow_forward(model.layers[:stop], x)
        expected = bits_per_dim(reference_log_prob(part.prior, h_direct) + logdet + logp_factored, D, N_BINS)
        torch.testing.assert_close(out.prefix_bpd, expected.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("boundary_prior", BOUNDARY_PRIORS)
def test_gradient_isolation(boundary_prior):
    """Each part's loss reaches every parameter of that part, its boundary prior's included, and no other."""
    model = make_glow(levels=3, steps=2, seed=11)
    parts = split_into_parts(model, "across", 3, boundary_prior=boundary_prior)
    for p in parts[:-1]:
        p.prior.double()
        _perturb_prior(p.prior, seed=p.index)
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
    in_priors = sum(1 for p in parts[:-1] for _ in p.prior.parameters())
    assert (in_priors == 0) == (boundary_prior == "standard")
    assert all(own) and sum(own) == sum(1 for _ in model.parameters()) + in_priors


# --- the boundary priors ---------------------------------------------------------------------------


@torch.no_grad()
def _perturb_prior(prior, seed=0, std=0.1):
    """Move every parameter of a boundary prior off its zero start, so no test passes by N(0, I)."""
    gen = torch.Generator().manual_seed(seed + 777)
    perturb_zero_convs(prior, seed)
    for p in prior.parameters():
        p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _gaussian(h, mean, log_std):
    return torch.distributions.Normal(mean, torch.exp(log_std)).log_prob(h).flatten(1).sum(1)


def reference_log_prob(prior, h):
    """Each boundary prior's density by its textbook formula, computed apart from the prior's own code."""
    if isinstance(prior, StandardNormal):
        return _gaussian(h, torch.zeros_like(h), torch.zeros_like(h))
    if isinstance(prior, LearnedGaussian):
        return _gaussian(h, prior.mean.expand_as(h), prior.log_std.expand_as(h))
    if isinstance(prior, ConditionalGaussian):
        a, b = h[:, : prior.keep], h[:, prior.keep :]
        conv = prior.predict
        params = F.conv2d(a, conv.conv.weight, conv.conv.bias, padding=1) * torch.exp(3 * conv.log_scale)
        mean, log_std = params[:, : b.shape[1]], params[:, b.shape[1] :]
        return _gaussian(a, prior.first.mean.expand_as(a), prior.first.log_std.expand_as(a)) + \
            _gaussian(b, mean, log_std)
    assert isinstance(prior, FlowPrior)
    out = []
    for sample in h:  # change of variables with the full Jacobian of g, one sample at a time

        def g(v):
            v = v.unsqueeze(0)
            for step in prior.steps:
                v, _ = step(v)
            return v[0]

        z = g(sample)
        jac = torch.autograd.functional.jacobian(g, sample).reshape(z.numel(), sample.numel())
        base = _gaussian(z[None], prior.base.mean, prior.base.log_std)[0]
        out.append(base + torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("name", BOUNDARY_PRIORS)
def test_boundary_prior_is_its_textbook_density(name):
    shape = (4, 2, 2)
    torch.manual_seed(5)
    prior = boundary_prior(name, shape).double()
    h = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    prior.log_prob(h)  # a flow head's ActNorms initialise on their first batch
    _perturb_prior(prior, seed=3)
    torch.testing.assert_close(prior.log_prob(h), reference_log_prob(prior, h), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["position", "conditional"])
def test_boundary_prior_starts_as_the_standard_normal_and_learns_per_position(name):
    shape = (4, 3, 3)
    prior = boundary_prior(name, shape).double()
    h = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prior.log_prob(h), StandardNormal().log_prob(h), rtol=0, atol=1e-12)
    gaussian = prior if name == "position" else prior.first
    assert gaussian.mean.shape[-2:] == shape[-2:]  # one mean per position, not per channel only
    with torch.no_grad():
        gaussian.mean[0, 0, 1, 2] = 3.0  # one position only
    moved = h.clone()
    moved[:, 0, 1, 2] += 3.0
    torch.testing.assert_close(prior.log_prob(moved), StandardNormal().log_prob(h))


def test_flow_prior_integrates_to_one():
    """A flow head on a 1x1 output of 2 channels: its density sums to 1 on a fine grid.

    The perturbation is small because a coupling whose scale falls near 0 spreads the mass
    far beyond any grid (the density stays normalised, the grid would not show it).
    """
    torch.manual_seed(0)
    prior = boundary_prior("flow", (2, 1, 1)).double()
    prior.log_prob(torch.randn(64, 2, 1, 1, dtype=torch.float64))
    _perturb_prior(prior, seed=1, std=0.01)
    assert not torch.allclose(prior.log_prob(torch.zeros(1, 2, 1, 1, dtype=torch.float64)),
                              StandardNormal().log_prob(torch.zeros(1, 2, 1, 1)).double())
    grid = torch.linspace(-12, 12, 481, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    h = torch.stack([a.flatten(), b.flatten()], 1).reshape(-1, 2, 1, 1)
    mass = prior.log_prob(h).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 1e-3


@pytest.mark.parametrize("name", BOUNDARY_PRIORS)
def test_boundary_prior_is_the_parts_and_never_the_glued_models(name):
    """The part's state dict (its checkpoint) holds the prior; the model's (model.pt, fine-tuning) does not."""
    model = Glow(1, 8, levels=2, steps=2, hidden=4)
    parts = split_into_parts(model, "across", 2, boundary_prior=name)
    prior_params = {id(p) for p in parts[0].prior.parameters()}
    assert prior_params.isdisjoint(id(p) for p in model.parameters())
    assert prior_params <= {id(p) for p in parts[0].parameters()}  # what PartTrainer's optimiser trains
    keys = [k for k in parts[0].state_dict() if k.startswith("prior.")]
    assert (not keys) == (name == "standard")
    whole = whole_model_part(model)  # what fine-tuning trains
    assert whole.prior is model.top_prior and {id(p) for p in whole.parameters()} == {id(p) for p in model.parameters()}


def test_unknown_boundary_prior_is_refused():
    with pytest.raises(UserError):
        boundary_prior("nonsense", (4, 2, 2))
    with pytest.raises(UserError):
        boundary_prior("conditional", (1, 2, 2))
