"""The whole Glow: invertibility, log-det of the full bijection x -> latents, log_prob, sampling, cuts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_glow
from torch.autograd.functional import jacobian

from pipeflow.glow import FlowStep, Glow, Split, Squeeze


@pytest.fixture(params=[(2, "affine", True), (3, "affine", False), (3, "additive", True)],
                ids=["L2-affine-lu", "L3-affine-plain", "L3-additive-lu"])
def model(request) -> Glow:
    levels, coupling, lu = request.param
    return make_glow(levels=levels, coupling=coupling, lu=lu, seed=levels)


def _x(n=3, seed=7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64) - 0.5


def test_inverse_of_forward(model):
    x = _x()
    zs, logdet = model(x)
    assert logdet.shape == (3,)
    assert sum(z[0].numel() for z in zs) == 64  # the latents hold exactly as many numbers as x
    assert zs[-1].shape[1:] == model.latent_shape
    torch.testing.assert_close(model.inverse(zs), x, rtol=1e-9, atol=1e-9)


def test_logdet_is_that_of_the_map_to_all_latents(model):
    """The factored-out latents and the top latent form a bijection of x; its Jacobian gives the log-det."""
    x = _x()
    _, logdet = model(x)

    def to_latents(v: torch.Tensor) -> torch.Tensor:
        zs, _ = model(v.reshape(1, 1, 8, 8))
        return torch.cat([z.flatten() for z in zs])

    for i in range(len(x)):
        jac = jacobian(to_latents, x[i].flatten())
        assert jac.shape == (64, 64)
        _, logabsdet = torch.linalg.slogdet(jac)
        torch.testing.assert_close(logdet[i], logabsdet, rtol=1e-8, atol=1e-8)


def test_log_prob_is_top_prior_plus_split_priors_plus_logdet(model):
    x = _x()
    zs, logdet = model(x)
    # recompute each split's conditional prior directly from the latent it keeps
    split_log_p = torch.zeros(len(x), dtype=torch.float64)
    h = x
    for layer in model.layers:
        if isinstance(layer, Split):
            kept, z = h[:, : layer.keep], h[:, layer.keep :]
            mean, log_std = (layer.prior.conv(kept) * torch.exp(3.0 * layer.prior.log_scale)).chunk(2, dim=1)
            split_log_p += torch.distributions.Normal(mean, log_std.exp()).log_prob(z).flatten(1).sum(1)
            h = kept
        else:
            h = layer(h)[0]
    torch.testing.assert_close(h, zs[-1])
    prior = model.top_prior
    with torch.no_grad():
        prior.mean.normal_(0, 0.1)
        prior.log_std.normal_(0, 0.1)
    top = torch.distributions.Normal(prior.mean, prior.log_std.exp()).log_prob(zs[-1]).flatten(1).sum(1)
    expected = top + split_log_p + logdet
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-10, atol=1e-9)


def test_state_dict_round_trip_keeps_log_prob():
    model = make_glow(levels=2)
    x = _x()
    fresh = Glow(1, 8, 2, 2, 8).double()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.log_prob(x + 0.3), model.log_prob(x + 0.3), rtol=0, atol=0)


def test_sample_shape_finite_and_seeded(model):
    a = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(3))
    c = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # temperature 0 is the mode of every prior: the seed no longer matters
    z0 = model.sample(2, temperature=0.0, generator=torch.Generator().manual_seed(1))
    z1 = model.sample(2, temperature=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z0, z1)


def test_sample_inverts_to_the_drawn_latents():
    """Sampling then encoding gives back a top latent at the prior's mean when temperature is 0."""
    model = make_glow(levels=2)
    x = model.sample(2, temperature=0.0)
    zs, _ = model(x)
    torch.testing.assert_close(zs[-1], model.top_prior.mean.expand_as(zs[-1]).detach(), rtol=1e-8, atol=1e-8)


def test_temperature_scales_each_prior_draw_around_its_mean():
    """x_T = mean + T * std * eps with the same eps for every T: checked on the top latent of a
    whole sample (encoded back) and on a split's conditional prior, with non-trivial stds."""
    model = make_glow(levels=2)
    with torch.no_grad():
        model.top_prior.mean.normal_(0.0, 0.3)
        model.top_prior.log_std.normal_(0.0, 0.5)
    tops = {t: model(model.sample(3, t, torch.Generator().manual_seed(5)))[0][-1] for t in (0.0, 0.5, 1.0)}
    eps = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(5)).double()
    std = model.top_prior.log_std.detach().exp()
    torch.testing.assert_close(tops[0.0], model.top_prior.mean.detach().expand(3, -1, -1, -1), rtol=0, atol=1e-8)
    for t in (0.5, 1.0):
        torch.testing.assert_close(tops[t] - tops[0.0], t * std * eps, rtol=0, atol=1e-8)

    split = next(layer for layer in model.layers if isinstance(layer, Split))
    h_kept = torch.randn(3, split.keep, 4, 4, dtype=torch.float64)
    zs = {t: split.sample(h_kept, t, torch.Generator().manual_seed(6))[:, split.keep:] for t in (0.0, 0.5, 1.0)}
    mean, log_std = split.prior(h_kept).detach().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(6)).double()
    assert log_std.abs().max() > 1e-3  # the conditional std is not 1
    torch.testing.assert_close(zs[0.0], mean, rtol=0, atol=1e-12)
    for t in (0.5, 1.0):
        torch.testing.assert_close(zs[t] - zs[0.0], t * log_std.exp() * eps, rtol=0, atol=1e-12)


def test_layer_layout_and_shapes():
    model = Glow(1, 8, levels=3, steps=2, hidden=4)
    kinds = [type(layer) for layer in model.layers]
    level = [Squeeze, FlowStep, FlowStep]
    assert kinds == level + [Split] + level + [Split] + level
    assert model.layer_shapes[0] == ((1, 8, 8), (4, 4, 4))
    assert model.layer_shapes[3] == ((4, 4, 4), (2, 4, 4))
    assert model.latent_shape == (16, 1, 1)  # 1x8x8 -> 4x4x4 -> 2x4x4 -> 8x2x2 -> 4x2x2 -> 16x1x1
    assert model.num_steps == 6


def test_cut_index_semantics():
    model = Glow(1, 8, levels=3, steps=2, hidden=4)
    # inside a level the cut falls between two steps; at a level's end it falls after the split,
    # and before the squeeze that opens the next level
    assert [model.cut_index(k) for k in range(7)] == [0, 2, 4, 6, 8, 10, 11]
    for k in range(7):
        i = model.cut_index(k)
        assert sum(isinstance(layer, FlowStep) for layer in model.layers[:i]) == k
        if 0 < i < len(model.layers):
            assert not isinstance(model.layers[i - 1], Squeeze)
            assert not isinstance(model.layers[i], Split)
    for bad in (-1, 7):
        with pytest.raises(ValueError):
            model.cut_index(bad)


def test_image_size_must_be_divisible():
    with pytest.raises(ValueError, match="divisible"):
        Glow(1, 8, levels=4, steps=1, hidden=4)
