"""The Glow model: L levels of [squeeze, K flow steps, split], the last level without split.

The model is one flat ``nn.ModuleList`` of layers so that it can be cut between any two
flow steps (see :mod:`pipeflow.parts`). Walking a slice of that list is done by
:func:`flow_forward` and :func:`flow_inverse`, which the whole model and every part share.

    log p(x) = log p_top(h_L) + sum_splits log p(z_l | h_l) + sum_layers log|det J_layer|
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeflow.glow.actnorm import ActNorm
from pipeflow.glow.coupling import AdditiveCoupling, AffineCoupling
from pipeflow.glow.gaussian import LearnedGaussian
from pipeflow.glow.invconv import InvConv1x1, InvConv1x1LU, SingularWeightError
from pipeflow.glow.split import Split
from pipeflow.glow.squeeze import Squeeze

Shape = tuple[int, int, int]


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, channels: int, hidden: int, coupling: str = "affine", lu: bool = True):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1LU(channels) if lu else InvConv1x1(channels)
        coupling_cls = {"affine": AffineCoupling, "additive": AdditiveCoupling}[coupling]
        self.coupling = coupling_cls(channels, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


def flow_forward(layers: Sequence[nn.Module], h: torch.Tensor):
    """Run ``h`` through ``layers``.

    Returns ``(h_out, zs, logdet, logp_factored)``: the output, the latents factored out by
    splits (in order), the per-sample sum of log-dets, and the per-sample sum of
    ``log p(z | h_kept)`` over the splits.
    """
    logdet = h.new_zeros(h.shape[0])
    logp_factored = h.new_zeros(h.shape[0])
    zs = []
    for layer in layers:
        if isinstance(layer, Split):
            h, z, log_p = layer(h)
            zs.append(z)
            logp_factored = logp_factored + log_p
        else:
            h, ld = layer(h)
            logdet = logdet + ld
    return h, zs, logdet, logp_factored


def flow_inverse(layers: Sequence[nn.Module], h: torch.Tensor, zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Undo :func:`flow_forward`: every split's latent is fed back in reverse order."""
    zs = list(zs)
    for layer in reversed(layers):
        h = layer.inverse(h, zs.pop()) if isinstance(layer, Split) else layer.inverse(h)
    if zs:
        raise ValueError(f"{len(zs)} latents were not consumed by the inverse")
    return h


def flow_sample(layers: Sequence[nn.Module], h: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Invert ``layers`` from ``h``, drawing each split's latent from its conditional prior."""
    for layer in reversed(layers):
        h = layer.sample(h, temperature, generator) if isinstance(layer, Split) else layer.inverse(h)
    return h


class Glow(nn.Module):
    """Glow for images of shape ``(in_channels, image_size, image_size)`` in [-0.5, 0.5]."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        levels: int,
        steps: int,
        hidden: int,
        coupling: str = "affine",
        lu: bool = True,
    ):
        super().__init__()
        if image_size % (2**levels):
            raise ValueError(f"image size {image_size} is not divisible by 2^levels = {2**levels}")
        self.input_shape: Shape = (in_channels, image_size, image_size)
        self.levels, self.steps = levels, steps
        layers: list[nn.Module] = []
        shapes: list[tuple[Shape, Shape]] = []
        c, s = in_channels, image_size
        for level in range(levels):
            layers.append(Squeeze())
            shapes.append(((c, s, s), (4 * c, s // 2, s // 2)))
            c, s = 4 * c, s // 2
            for _ in range(steps):
                layers.append(FlowStep(c, hidden, coupling, lu))
                shapes.append(((c, s, s), (c, s, s)))
            if level < levels - 1:
                layers.append(Split(c))
                shapes.append(((c, s, s), (c // 2, s, s)))
                c = c // 2
        self.layers = nn.ModuleList(layers)
        for name, module in self.named_modules():
            if isinstance(module, (ActNorm, InvConv1x1, InvConv1x1LU)):
                module.name = name  # the model-wide name: errors found in a part or in inverse() use it
        self.layer_shapes = shapes
        self.latent_shape: Shape = (c, s, s)
        self.top_prior = LearnedGaussian(self.latent_shape)

    @property
    def num_steps(self) -> int:
        return self.levels * self.steps

    def cut_index(self, steps_before: int) -> int:
        """Index into ``layers`` of a cut made after ``steps_before`` flow steps.

        A cut at a level's end falls after that level's split, so a part owns the split
        (and its conditional prior) of the level whose steps it ends with.
        """
        if not 0 <= steps_before <= self.num_steps:
            raise ValueError(f"a cut must lie between 0 and {self.num_steps} flow steps, got {steps_before}")
        if steps_before == self.num_steps:
            return len(self.layers)
        seen = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, FlowStep):
                if seen == steps_before:
                    # back up over the squeeze that opens a level: it belongs with the level
                    return i - 1 if isinstance(self.layers[i - 1], Squeeze) else i
                seen += 1
        raise AssertionError("unreachable")

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return ``(zs, logdet)``: every split's latent then the top latent, and the flow's log|det|."""
        h, zs, logdet, _ = flow_forward(self.layers, x)
        return zs + [h], logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample log-density of continuous ``x`` in nats (no dequantisation constant)."""
        h, _, logdet, logp_factored = flow_forward(self.layers, x)
        return self.top_prior.log_prob(h) + logp_factored + logdet

    def inverse(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        return flow_inverse(self.layers, zs[-1], zs[:-1])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, generator=None) -> torch.Tensor:
        h = self.top_prior.sample((n, *self.latent_shape), temperature, generator)
        return flow_sample(self.layers, h, temperature, generator)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every ActNorm from one batch (a forward pass)."""
        flow_forward(self.layers, x)

    def check_invertible(self) -> None:
        """Raise :class:`SingularWeightError` naming the first layer that is no longer invertible."""
        check_invertible(self)


def check_invertible(module: nn.Module, where: str = "") -> None:
    """Raise :class:`SingularWeightError` naming the first 1x1 convolution or ActNorm of
    ``module`` that is no longer invertible (a singular weight, a zero or non-finite scale)."""
    prefix = f"{where}: " if where else ""
    for name, m in module.named_modules():
        if isinstance(m, (InvConv1x1, InvConv1x1LU)):
            try:
                m.check_invertible(m.name or name)
            except SingularWeightError as exc:
                raise SingularWeightError(f"{prefix}{exc}") from None
        elif isinstance(m, ActNorm):
            if not torch.isfinite(m.log_scale.detach()).all() or not torch.isfinite(m.bias.detach()).all():
                raise SingularWeightError(f"{prefix}ActNorm {m.name or name} has a non-finite scale or bias "
                                          "(not invertible)")


def is_initialized(module: nn.Module) -> bool:
    """True once every ActNorm inside ``module`` has seen data."""
    return all(bool(m.initialized) for m in module.modules() if isinstance(m, ActNorm))


__all__ = ["FlowStep", "Glow", "SingularWeightError", "check_invertible", "flow_forward", "flow_inverse", "flow_sample",
           "is_initialized"]
