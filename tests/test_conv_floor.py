"""The floor of a step's convolutions (pipeflow.tools.conv_floor): what it records, and what it times."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_glow
from pipeflow.tools.conv_floor import LAYOUTS, ConvCall, convolution_floor, record_convolutions
from pipeflow.tools.flops import step_flops


def recorded_flops(calls) -> float:
    return sum(n * c.train_flops for c, n in calls.items())


def test_a_flows_recorded_convolutions_are_what_the_flop_model_counts():
    """Every convolution of a Glow's forward pass, the LU 1x1 ones (F.conv2d on a built weight) included:
    per flow step three in its coupling network and one 1x1, and the split prior's; their FLOPs are the
    FLOP model's, less the few per element it adds on top (at most 10 %)."""
    model = make_glow(in_channels=3, image_size=16, levels=2, steps=2, hidden=32)
    batch = 8
    calls = record_convolutions(lambda: model(torch.rand(batch, 3, 16, 16, dtype=torch.float64) - 0.5))
    assert sum(calls.values()) == 4 * 4 + 1
    one_by_one = [c for c in calls if c.weight[2:] == (1, 1)]
    assert sum(calls[c] for c in one_by_one) == 4 + 4  # each step's invertible 1x1 and its network's middle
    assert {c.input[0] for c in calls} == {batch}
    modelled = 3 * batch * sum(step_flops(model))
    assert 1.0 <= modelled / recorded_flops(calls) <= 1.1


def test_recording_changes_nothing_and_sees_every_layout():
    """The recorder runs under no_grad and hands every call through: the same output, no graph; a
    channels_last copy of a convolution records the same call."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    out = []
    calls = record_convolutions(lambda: out.append(conv(x)))
    assert torch.equal(out[0], conv(x).detach()) and not out[0].requires_grad
    nhwc = nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    assert record_convolutions(lambda: nhwc(x.contiguous(memory_format=torch.channels_last))) == calls
    (call,) = calls
    assert call == ConvCall((2, 4, 5, 5), (6, 4, 3, 3), True, (1, 1), (1, 1), (1, 1), 1)
    assert call.train_flops == 3 * 2 * 2 * 5 * 5 * 6 * 4 * 9


def test_a_strided_grouped_call_counts_its_output_pixels():
    call = ConvCall((1, 4, 8, 8), (6, 2, 3, 3), False, (2, 2), (1, 1), (1, 1), 2)
    assert call.train_flops == 3 * 2 * 4 * 4 * 6 * 2 * 9  # a 4x4 output; 2 input channels per group


def test_the_floor_is_each_calls_fastest_pass_times_its_count():
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 3, padding=1))
    x = torch.randn(4, 2, 6, 6)
    floor = convolution_floor(lambda: (net(x), net(x)), torch.device("cpu"), repeats=2)
    rows = floor["convolutions"]
    assert [row["count"] for row in rows] == [2, 2, 2]
    assert {ConvCall.from_row(row) for row in rows} == set(record_convolutions(lambda: net(x)))  # rows read back
    assert floor["seconds"] == pytest.approx(sum(row["count"] * row["seconds"] for row in rows))
    for row in rows:
        assert row["layout"] in LAYOUTS and row["seconds"] > 0
        assert row["flops_per_s"] == pytest.approx(ConvCall.from_row(row).train_flops / row["seconds"])
    assert [r["count"] * r["seconds"] for r in rows] == sorted((r["count"] * r["seconds"] for r in rows), reverse=True)
