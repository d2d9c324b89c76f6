"""The docs' runnable example runs and prints what the docs say it prints.

Its bits/dim depend on the BLAS build in their last digits, so they are checked for what they mean, not
for their digits: both lines give the same figure (the docs' claim: the last part's prefix bits/dim is the
model's), a model of uniform noise cannot beat the noise's entropy, and the docs' figure is the one printed
up to that rounding."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from support import ENV, ROOT, ok

BITS_PER_DIM = re.compile(r"^([0-9.]+) bits/dim$")


def test_the_api_example_prints_what_docs_api_md_says():
    text = (ROOT / "docs" / "api.md").read_text()
    example = text[text.index("## Example"):]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", example, flags=re.S)[:2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=ENV)
    ok(result)
    got, documented = result.stdout.splitlines(), printed.splitlines()
    assert len(got) == len(documented) == 4, result.stdout
    assert got[0] == documented[0] and got[3] == documented[3]  # the shapes of latents and samples
    whole, by_parts = (float(BITS_PER_DIM.match(line).group(1)) for line in got[1:3])
    assert by_parts == pytest.approx(whole, abs=1e-3)  # printed to 3 decimals
    # x is uniform on [-0.5, 0.5)^64: no density's cross-entropy on it is below its entropy, log2(17) bits/dim here
    assert math.log2(17) < whole < 8
    assert float(BITS_PER_DIM.match(documented[1]).group(1)) == pytest.approx(whole, abs=0.01)
