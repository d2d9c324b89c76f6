"""Fit bpd = a + b * epoch^(-c) to e2e72.json's averaged curve (epoch 10 on) and predict, for longer
budgets, how much e2e would still gain over its last 30 % (its epochs take equal time).

    python docs/results/mnist_plateau/fit.py
"""

import json
from pathlib import Path

import numpy as np

history = json.loads((Path(__file__).parent / "e2e72.json").read_text())["history"]
evals = [r for r in history if r["kind"] == "eval" and r["epoch"] >= 10]
epochs = np.array([r["epoch"] for r in evals], float)
bpd = np.array([r["test_bpd_ema"] for r in evals])

fits = []
for c in np.linspace(0.2, 3.0, 57):  # least squares in (a, b) for each exponent c
    design = np.stack([np.ones_like(epochs), epochs ** -c], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, bpd, rcond=None)
    fits.append((float(((design @ [a, b] - bpd) ** 2).mean() ** 0.5), c, a, b))
rms, c, a, b = min(fits)
print(f"a = {a:.2f}, b = {b:.2f}, c = {c:.2f}; rms {rms:.4f} bpd")
for budget in (72, 108, 144, 216, 300):
    gain = b * ((0.7 * budget) ** -c - budget ** -c)
    print(f"{budget} epochs: gains {gain:.3f} bpd over its last 30 %, ends at {a + b * budget ** -c:.3f}")
