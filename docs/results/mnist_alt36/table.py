"""The figures of README.md's 36-epoch one-device comparison, from the two seeds' compare.json:

    python docs/results/mnist_alt36/table.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent


def evals(run: dict) -> list[dict]:
    return [e for e in run["history"] if e["kind"] == "eval"]


def ema_at(points: list[dict], seconds: float) -> float:
    """The averaged weights' bits/dim after ``seconds`` of training (linear between evaluations)."""
    for a, b in zip(points, points[1:]):
        if a["train_seconds"] <= seconds <= b["train_seconds"]:
            f = (seconds - a["train_seconds"]) / (b["train_seconds"] - a["train_seconds"])
            return a["test_bpd_ema"] + f * (b["test_bpd_ema"] - a["test_bpd_ema"])
    return points[-1]["test_bpd_ema"]


for seed in (0, 1):
    runs = json.loads((HERE / f"seed{seed}" / "compare.json").read_text())["runs"]
    for name in ("e2e", "alternate2"):
        r = runs[name]
        print(f"seed {seed} {name}: raw {r['test_bpd']:.4f}, EMA {evals(r)[-1]['test_bpd_ema']:.4f}, "
              f"{r['train_seconds']:.1f} s of training, {r.get('cpu_seconds', 0):.1f} s of CPU")
    e2e, alt = evals(runs["e2e"]), evals(runs["alternate2"])
    end = alt[-1]["train_seconds"]
    print(f"  e2e's EMA at alternate2's last second ({end:.0f} s): {ema_at(e2e, end):.4f}")
    by_parts = [e for e in alt if e["phase"] == "by_parts"]
    print(f"  end of the by-parts phase: epoch {by_parts[-1]['epoch']}, {by_parts[-1]['train_seconds']:.0f} s, "
          f"EMA {by_parts[-1]['test_bpd_ema']:.4f}")
    at_70 = max((e for e in e2e if e["train_seconds"] <= 0.7 * e2e[-1]["train_seconds"]),
                key=lambda e: e["train_seconds"])
    print(f"  e2e's gain over its last 30 % of time: {at_70['test_bpd_ema'] - e2e[-1]['test_bpd_ema']:.4f}")
    for level in (3.0, 2.6, 2.4):
        t_e2e = next(e["train_seconds"] for e in e2e if e["test_bpd_ema"] <= level)
        t_parts = next(e["train_seconds"] for e in by_parts if e["test_bpd_ema"] <= level)
        print(f"  EMA {level}: e2e after {t_e2e:.0f} s, the by-parts phase after {t_parts:.0f} s")
