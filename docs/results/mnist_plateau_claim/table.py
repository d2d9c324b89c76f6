"""The figures of README.md's one-device claim at a plateau, from the two seeds' compare.json:

    python docs/results/mnist_plateau_claim/table.py            # lr 4e-3 (session 7), the folders here
    python docs/results/mnist_plateau_claim/table.py lr2e-3     # lr 2e-3 (session 8), the folders in lr2e-3/

At 4e-3 seed 1's alternate2 diverged; its evaluations until then are in seed1/alternate2_evals.json.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else "")


def evals(run: dict) -> list[dict]:
    return [e for e in run["history"] if e["kind"] == "eval"]


def at(points: list[dict], x: float, key: str, along: str = "train_seconds") -> float:
    """``key`` after ``x`` (seconds or epochs) of training, linear between evaluations."""
    for a, b in zip(points, points[1:]):
        if a[along] <= x <= b[along]:
            f = (x - a[along]) / (b[along] - a[along])
            return a[key] + f * (b[key] - a[key])
    return points[-1][key]


def first_reaching(points: list[dict], level: float) -> float | None:
    """The training seconds at the first evaluation whose averaged bits/dim is at or under ``level``."""
    return next((p["train_seconds"] for p in points if p["test_bpd_ema"] <= level), None)


def last_30(points: list[dict], key: str, along: str) -> float:
    """How much ``key`` fell over the last 30 % of the run, in ``along`` (seconds or epochs)."""
    end = points[-1][along]
    return at(points, 0.7 * end, key, along) - points[-1][key]


def e2e_figures(seed: int, e2e: dict) -> list[dict]:
    points = evals(e2e)
    print(f"seed {seed} e2e: EMA {points[-1]['test_bpd_ema']:.4f}, raw {e2e['test_bpd']:.4f}, "
          f"{e2e['train_seconds']:.1f} s of training, CPU {e2e['cpu_seconds']:.1f} s")
    for key in ("test_bpd_ema", "test_bpd"):
        print(f"  e2e's gain over its last 30 %, {key}: {last_30(points, key, 'epoch'):.4f} of epochs, "
              f"{last_30(points, key, 'train_seconds'):.4f} of seconds")
    return points


def alternate_figures(seed: int, alt: list[dict], e2e: list[dict], raw: float | None) -> None:
    end = alt[-1]["train_seconds"]
    done = f"raw {raw:.4f}, " if raw is not None else "diverged after it, "
    print(f"seed {seed} alternate2: EMA {alt[-1]['test_bpd_ema']:.4f} at epoch {alt[-1]['epoch']}, {done}"
          f"{end:.1f} s of training (time ratio {end / e2e[-1]['train_seconds']:.3f})")
    print(f"  e2e at alternate2's last second: EMA {at(e2e, end, 'test_bpd_ema'):.4f}, "
          f"raw {at(e2e, end, 'test_bpd'):.4f}")
    by_parts = [e for e in alt if e["phase"] == "by_parts"]
    last = by_parts[-1]
    print(f"  by parts, last evaluation: epoch {last['epoch']}, {last['train_seconds']:.0f} s, EMA "
          f"{last['test_bpd_ema']:.4f}; e2e then: {at(e2e, last['train_seconds'], 'test_bpd_ema'):.4f}")
    speeds = []  # issue 15's target 1: how fast the by-parts phase reaches a bits/dim, against e2e
    for level in (3.0, 2.8, 2.6, 2.5, 2.4, 2.3, 2.25, 2.2):
        mine, theirs = first_reaching(by_parts, level), first_reaching(e2e, level)
        speeds.append(f"{level}: " + (f"{theirs / mine:.2f}" if mine and theirs else "never"))
    print("  e2e's seconds to an EMA bits/dim over the by-parts phase's: " + ", ".join(speeds))
    for epoch in (60, 120):
        a, e = next(x for x in alt if x["epoch"] == epoch), next(x for x in e2e if x["epoch"] == epoch)
        print(f"  epoch {epoch}: alternate2 EMA {a['test_bpd_ema']:.4f} after {a['train_seconds']:.0f} s, "
              f"e2e {e['test_bpd_ema']:.4f} after {e['train_seconds']:.0f} s")


for seed in sorted(int(p.name[4:]) for p in HERE.glob("seed*")):
    runs = json.loads((HERE / f"seed{seed}" / "compare.json").read_text())["runs"]
    e2e = e2e_figures(seed, runs["e2e"])
    if "error" in runs["alternate2"]:
        # the last evaluation is the resumed run's, whose average restarted (see the file's note): left out
        alt = json.loads((HERE / f"seed{seed}" / "alternate2_evals.json").read_text())["evals"][:-1]
        print(f"seed {seed} alternate2 FAILED: {runs['alternate2']['error'][:100]}...")
        alternate_figures(seed, alt, e2e, None)
    else:
        alternate_figures(seed, evals(runs["alternate2"]), e2e, runs["alternate2"]["test_bpd"])
