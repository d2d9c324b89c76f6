"""Every flow layer: inverse undoes forward, and the log-det is log|det| of the brute-force Jacobian.

One generic test parametrised over the layers (normflows' style); log-dets are checked against
``torch.autograd.functional.jacobian`` in float64 (zuko's style).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb_zero_convs
from torch.autograd.functional import jacobian

from pipeflow.glow import (ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1, InvConv1x1LU,
                           Split, Squeeze)
from pipeflow.glow.invconv import SingularWeightError

SHAPE = (2, 4, 4, 4)  # (batch, channels, height, width)


def _data(shape=SHAPE, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # not centred, not unit-variance: ActNorm's init then does something
    return 0.7 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Move every parameter away from its (often structured) initial value."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_actnorm(c):
    layer = ActNorm(c).double()
    layer(_data((8, c, 4, 4), seed=2))  # data-dependent init
    return layer


def make_invconv(c):
    layer = InvConv1x1(c).double()
    _perturb(layer, 3)  # a random rotation has log|det| = 0; make it non-trivial
    return layer


def make_invconv_lu(c):
    layer = InvConv1x1LU(c).double()
    _perturb(layer, 4)
    return layer


def make_affine(c):
    layer = AffineCoupling(c, hidden=8).double()
    layer(_data((8, c, 4, 4), seed=5))  # initialise the ActNorms inside the coupling network
    perturb_zero_convs(layer, seed=6, std=0.3)
    return layer


def make_additive(c):
    layer = AdditiveCoupling(c, hidden=8).double()
    layer(_data((8, c, 4, 4), seed=7))
    perturb_zero_convs(layer, seed=8, std=0.3)
    return layer


def make_squeeze(c):
    return Squeeze()


def make_flowstep(c, coupling="affine", lu=True):
    layer = FlowStep(c, hidden=8, coupling=coupling, lu=lu).double()
    layer(_data((8, c, 4, 4), seed=9))
    perturb_zero_convs(layer, seed=10, std=0.3)
    _perturb(layer.invconv, 11)
    return layer


LAYERS = {
    "actnorm": (make_actnorm, 4),
    "invconv": (make_invconv, 4),
    "invconv_lu": (make_invconv_lu, 4),
    "affine": (make_affine, 4),
    "affine_odd_channels": (make_affine, 3),
    "additive": (make_additive, 4),
    "squeeze": (make_squeeze, 4),
    "flowstep_affine_lu": (make_flowstep, 4),
    "flowstep_additive_plain": (lambda c: make_flowstep(c, "additive", lu=False), 4),
}


@pytest.fixture(params=sorted(LAYERS))
def layer_and_input(request):
    make, c = LAYERS[request.param]
    torch.manual_seed(0)
    return make(c), _data((SHAPE[0], c, *SHAPE[2:]), seed=20)


def test_inverse_undoes_forward(layer_and_input):
    layer, x = layer_and_input
    y, logdet = layer(x)
    assert y.dtype == torch.float64 and logdet.shape == (x.shape[0],)
    assert y.numel() == x.numel()
    assert not torch.allclose(y.flatten(), x.flatten())  # not the identity (squeeze permutes)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(layer.inverse(y))[0], y, rtol=1e-9, atol=1e-9)


def test_logdet_matches_brute_force_jacobian(layer_and_input):
    layer, x = layer_and_input
    _, logdet = layer(x)
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = jacobian(lambda v: layer(v.reshape(xi.shape))[0].flatten(), xi.flatten())
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], logabsdet, rtol=1e-8, atol=1e-8)


def test_logdet_is_per_sample():
    """The coupling's log-det depends on the sample: two different inputs give two different values."""
    layer, x = make_affine(4), _data(seed=21)
    _, logdet = layer(x)
    assert not torch.isclose(logdet[0], logdet[1])


# --- Split -----------------------------------------------------------------------------------------


def _split():
    layer = Split(6).double()
    perturb_zero_convs(layer, seed=30, std=0.3)
    return layer


def test_split_inverse_and_conditional_log_prob():
    layer = _split()
    h = _data((3, 6, 4, 4), seed=31)
    h_kept, z, log_p = layer(h)
    assert h_kept.shape == (3, 3, 4, 4) and z.shape == (3, 3, 4, 4) and log_p.shape == (3,)
    torch.testing.assert_close(layer.inverse(h_kept, z), h, rtol=0, atol=0)
    # direct computation: z ~ N(mean, std^2) with (mean, log_std) = conv(h_kept)
    params = layer.prior.conv(h_kept) * torch.exp(3.0 * layer.prior.log_scale)
    mean, log_std = params[:, :3], params[:, 3:]
    assert log_std.abs().max() > 1e-3  # the prior is not N(0, I)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(log_p, expected, rtol=1e-10, atol=1e-10)


def test_split_sample_draws_from_the_conditional_prior():
    layer = _split()
    h_kept = _data((2, 3, 4, 4), seed=32)
    out = layer.sample(h_kept, temperature=0.0)
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, :3], h_kept)
    mean = (layer.prior.conv(h_kept) * torch.exp(3.0 * layer.prior.log_scale))[:, :3]
    torch.testing.assert_close(out[:, 3:], mean)  # temperature 0: exactly the conditional mean


# --- ActNorm ---------------------------------------------------------------------------------------


def test_actnorm_data_dependent_init():
    layer = ActNorm(4).double()
    x = _data((16, 4, 5, 5), seed=40) * torch.tensor([1.0, 3.0, 0.2, 7.0], dtype=torch.float64).view(1, 4, 1, 1)
    assert not bool(layer.initialized)
    y, logdet = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    # a second batch does not re-initialise
    bias = layer.bias.detach().clone()
    layer(x + 5.0)
    torch.testing.assert_close(layer.bias.detach(), bias, rtol=0, atol=0)


def test_actnorm_initialized_flag_travels_in_state_dict():
    trained = ActNorm(3)
    trained(torch.randn(8, 3, 4, 4) * 2 + 1)
    state = trained.state_dict()
    assert "initialized" in state and bool(state["initialized"])

    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    y, _ = fresh(torch.randn(8, 3, 4, 4) * 10 - 4)  # data that would give a very different init
    torch.testing.assert_close(fresh.bias, trained.bias, rtol=0, atol=0)
    torch.testing.assert_close(fresh.log_scale, trained.log_scale, rtol=0, atol=0)


def test_actnorm_loading_an_uninitialised_state_initialises_again():
    """The layer remembers it has seen data (no device sync per forward) until a state is loaded."""
    blank = ActNorm(3).state_dict()
    layer = ActNorm(3)
    layer(torch.randn(8, 3, 4, 4))
    layer.load_state_dict(blank)
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_a_saturated_affine_gate_keeps_a_finite_logdet_and_gradient():
    """float32, a coupling whose gate s + 2 is -150 for every element: sigmoid underflows to 0, so
    log(sigmoid) was -inf with an infinite gradient; the log-det is now sum(s + 2) to rounding, and the
    gradient of every parameter finite."""
    layer = AffineCoupling(4, hidden=8)
    with torch.no_grad():
        layer.net.out.conv.bias[2:] = -152.0  # the s half of the network's output; its weights stay zero
    x = torch.randn(3, 4, 5, 5)
    y, logdet = layer(x)
    assert torch.sigmoid(torch.tensor(-150.0)) == 0
    torch.testing.assert_close(logdet, torch.full((3,), -150.0 * 2 * 5 * 5))
    (logdet.sum() + y.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.net.out.conv.bias.grad[2:].abs().max() > 0  # the gradient reaches the gate


# --- 1x1 convolutions ------------------------------------------------------------------------------


def test_plain_invconv_logdet_is_computed_in_float64():
    """An ill-conditioned float32 weight: float32 slogdet is off by ~1e-2 here; float64 is exact."""
    c = 48
    gen = torch.Generator().manual_seed(50)
    q1, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    w = (q1 * torch.logspace(-3, 3, c, dtype=torch.float64)) @ q2
    layer = InvConv1x1(c)
    with torch.no_grad():
        layer.weight.copy_(w.float())
    x = torch.randn(2, c, 4, 4)
    _, logdet = layer(x)
    assert logdet.dtype == torch.float32
    reference = 16 * torch.linalg.slogdet(layer.weight.detach().double()).logabsdet
    assert abs(float(logdet[0].detach()) - float(reference)) < 1e-4


def test_initial_invconv_is_a_rotation():
    for cls in (InvConv1x1, InvConv1x1LU):
        layer = cls(6)
        _, logdet = layer(torch.randn(2, 6, 3, 3))
        torch.testing.assert_close(logdet, torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("lu", [True, False])
def test_check_invertible_names_the_singular_layer(lu):
    model = Glow(1, 8, levels=2, steps=2, hidden=4, lu=lu)
    model.check_invertible()  # a fresh model is fine
    target = model.layers[5].invconv  # level 2, first step
    with torch.no_grad():
        if lu:
            target.log_s[0] = -math.inf
        else:
            target.weight.zero_()
    with pytest.raises(SingularWeightError, match=r"layers\.5\.invconv"):
        model.check_invertible()
    with pytest.raises(SingularWeightError, match=r"^1x1 convolution layers\.5\.invconv has a singular"):
        target.inverse(torch.randn(1, target.weight().shape[0] if lu else target.weight.shape[0], 2, 2))
    with pytest.raises(SingularWeightError, match=r"layers\.5\.invconv"):
        model.sample(2)
