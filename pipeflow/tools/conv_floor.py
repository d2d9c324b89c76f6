"""The least time a training step's convolutions take on this device: the ceiling of its utilisation.

Utilisation (see :mod:`pipeflow.tools.bench`) holds a step to the rate of one wide convolution
(3x3, hidden -> hidden channels). A Glow step does not only run convolutions of that shape: the
coupling networks also run narrow ones (a few channels in, or out) and 1x1 ones, and those can
run far below the wide one's rate on the same device. So a utilisation figure alone cannot
tell a slow implementation from a model whose own convolutions cannot go faster.

The floor answers that. It records every convolution a forward pass of what a process trains
calls (their shapes, strides and padding, how many times), then times each distinct one alone,
forward and backward (gradients of its input and weights, as training needs them), in both memory
layouts, and keeps the faster. Their sum, at their counts, estimates the least time the step's
convolutions take on this device with these kernels, with everything else in the step free. It is a
measurement, not a bound: it moves with the machine's load as the steps do. The FLOP model's FLOPs
over that time, over the reference rate, is the most utilisation the step could reach: its ceiling.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GPU_PASSES = 10  # passes per timed sample on a GPU


@dataclass(frozen=True)
class ConvCall:
    """One convolution as a step calls it: input and weight shapes, whether it adds a bias, its geometry, its dtype."""

    input: tuple[int, ...]
    weight: tuple[int, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    dtype: str = "float32"

    @classmethod
    def from_row(cls, row: dict) -> "ConvCall":
        """The call a row of :func:`convolution_floor`'s table describes (read back from JSON too)."""
        def shape(key: str) -> tuple[int, ...]:
            return tuple(row[key])
        return cls(shape("input"), shape("weight"), row["bias"], shape("stride"), shape("padding"),
                   shape("dilation"), row["groups"], row.get("dtype", "float32"))

    @property
    def train_flops(self) -> float:
        """Forward FLOPs (2 per multiply-add) and a backward twice as costly: 3x the forward."""
        n, _, h, w = self.input
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (self.weight[2] - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (self.weight[3] - 1) - 1) // self.stride[1] + 1
        c_out, c_in_per_group, kh, kw = self.weight
        return 3 * 2.0 * n * out_h * out_w * c_out * c_in_per_group * kh * kw


class _Recorder(TorchDispatchMode):
    """Counts the 2-d convolutions that pass through torch's dispatcher while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[ConvCall] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, weight, bias, stride, padding, dilation, transposed, _, groups = args
            if not transposed and x.dim() == 4:
                dtype = str(x.dtype).removeprefix("torch.")
                self.calls[ConvCall(tuple(x.shape), tuple(weight.shape), bias is not None, tuple(stride),
                                    tuple(padding), tuple(dilation), groups, dtype)] += 1
        return func(*args, **(kwargs or {}))


def record_convolutions(forward: Callable[[], object]) -> Counter[ConvCall]:
    """Every convolution ``forward()`` calls, with how many times (run under ``no_grad``)."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        forward()
    return recorder.calls


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU): what every timing here starts and ends with."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pass(call: ConvCall, device: torch.device, layout: torch.memory_format) -> Callable[[], None]:
    """One training pass of ``call`` alone: forward, then the gradients of its input, weight and bias."""
    like = {"device": device, "dtype": getattr(torch, call.dtype)}
    x = torch.randn(call.input, **like).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(call.weight, **like).contiguous(memory_format=layout).requires_grad_()
    bias = torch.randn(call.weight[0], **like, requires_grad=True) if call.bias else None
    grad = torch.randn_like(F.conv2d(x.detach(), weight.detach(), None, call.stride, call.padding, call.dilation,
                                     call.groups)).contiguous(memory_format=layout)

    def once() -> None:
        F.conv2d(x, weight, bias, call.stride, call.padding, call.dilation, call.groups).backward(grad)
        x.grad = weight.grad = None
        if bias is not None:
            bias.grad = None
    return once


def time_convolutions(calls: list[ConvCall], device: torch.device, layouts: tuple[str, ...] = ("nchw", "nhwc"),
                      repeats: int = 5) -> dict[ConvCall, tuple[float, str]]:
    """The fastest of ``repeats`` training passes of each call, in the fastest of ``layouts``: (seconds, layout).

    Timed as the flow steps' costs are (:func:`pipeflow.tools.balance.fastest_seconds`: a warm-up pass, then
    rounds over every (call, layout)). On a GPU a sample is ``GPU_PASSES`` passes between two
    synchronisations, as a step queues its kernels: one pass would time the launch.
    """
    from pipeflow.tools.balance import fastest_seconds  # noqa: PLC0415

    inner = GPU_PASSES if device.type == "cuda" else 1
    keys = [(c, name) for c in calls for name in layouts]

    def samples(once: Callable[[], None]) -> Callable[[], None]:
        def sample() -> None:
            for _ in range(inner):
                once()
        return sample

    seconds = fastest_seconds([samples(_pass(c, device, LAYOUTS[name])) for c, name in keys], repeats, 1,
                              lambda: synchronize(device))
    best = {key: s / inner for key, s in zip(keys, seconds)}
    return {c: min((best[(c, name)], name) for name in layouts) for c in calls}


def convolution_floor(forward: Callable[[], object], device: torch.device, repeats: int = 5) -> dict:
    """The least seconds the convolutions of what ``forward`` runs take in one training pass, and each one's share.

    ``forward`` should run, once, the forward pass of everything a training step trains (at the step's
    batch), so that its convolutions are recorded as the step calls them.
    """
    calls = record_convolutions(forward)
    timed = time_convolutions(list(calls), device, repeats=repeats)
    table = [{**asdict(c), "count": n, "seconds": timed[c][0], "layout": timed[c][1],
              "flops_per_s": c.train_flops / timed[c][0]} for c, n in calls.items()]
    table.sort(key=lambda row: -row["count"] * row["seconds"])
    return {"seconds": sum(row["count"] * row["seconds"] for row in table), "convolutions": table}
