"""Glow (Kingma & Dhariwal, 2018) as a flat sequence of invertible layers.

Every flow layer is a small ``nn.Module`` whose ``forward(x)`` returns ``(y, logdet)``
with a per-sample ``logdet = log|det dy/dx|`` and whose ``inverse(y)`` returns ``x``.
The two exceptions are structural: :class:`Split` factors half of the channels out of
the flow (it returns the latent it factors out and that latent's log-density), and the
top :class:`LearnedGaussian` prior, which is a density, not a map.
"""

from pipeflow.glow.actnorm import ActNorm
from pipeflow.glow.coupling import AdditiveCoupling, AffineCoupling, CouplingNet
from pipeflow.glow.gaussian import LearnedGaussian, StandardNormal, gaussian_log_prob
from pipeflow.glow.invconv import InvConv1x1, InvConv1x1LU
from pipeflow.glow.model import FlowStep, Glow
from pipeflow.glow.split import Split
from pipeflow.glow.squeeze import Squeeze

__all__ = [
    "ActNorm", "AdditiveCoupling", "AffineCoupling", "CouplingNet", "FlowStep", "Glow",
    "InvConv1x1", "InvConv1x1LU", "LearnedGaussian", "Split", "Squeeze", "StandardNormal",
    "gaussian_log_prob",
]
