"""The model's narrow 3x3 convolutions computed three ways, forward and backward, one thread.

oneDNN's convolution (in NCHW and NHWC), im2col (``F.unfold``) and one matrix product, and one matrix
product onto the nine taps followed by a shifted sum. Each is the median of 9 passes, with large blocks
from the heap as in bench's timed steps. Run from the repository root:

    .venv/bin/python docs/benchmarks/narrow_convolutions.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn import functional as F

from pipeflow.tools.bench_worker import allocate_for_speed

SHAPES = [(2, 128, 14), (128, 4, 14), (4, 128, 7), (128, 8, 7)]  # (in, out, side) at batch 64: MNIST's two levels


def by_unfold(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, _, h, width = x.shape
    return (w.flatten(1) @ F.unfold(x, 3, padding=1)).view(n, w.shape[0], h, width)


def by_taps(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, c, h, width = x.shape
    o = w.shape[0]
    taps = (w.permute(2, 3, 0, 1).reshape(9 * o, c) @ x.flatten(2)).view(n, 3, 3, o, h, width)
    taps = F.pad(taps, (1, 1, 1, 1))
    return sum(taps[:, i, j, :, i:i + h, j:j + width] for i in range(3) for j in range(3))


def median_ms(fn, passes: int = 9) -> float:
    times = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    allocate_for_speed()
    print("| convolution | NCHW ms | NHWC ms | im2col ms | taps ms | best GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for c, o, side in SHAPES:
        x = torch.randn(64, c, side, side, requires_grad=True)
        w = torch.randn(o, c, 3, 3, requires_grad=True)
        g = torch.randn(64, o, side, side)
        for way in (by_unfold, by_taps):
            torch.testing.assert_close(way(x, w), F.conv2d(x, w, padding=1), atol=1e-3, rtol=1e-4)
        nhwc = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (x, w)]
        g_nhwc = g.contiguous(memory_format=torch.channels_last)
        ms = [median_ms(lambda: F.conv2d(x, w, padding=1).backward(g)),
              median_ms(lambda: F.conv2d(*nhwc, padding=1).backward(g_nhwc)),
              median_ms(lambda: by_unfold(x, w).backward(g)),
              median_ms(lambda: by_taps(x, w).backward(g))]
        flops = 3 * 2 * c * o * 9 * 64 * side * side
        print(f"| 3x3, {c} -> {o} at {side}x{side} | " + " | ".join(f"{m:.1f}" for m in ms)
              + f" | {flops / min(ms) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
