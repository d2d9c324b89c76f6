"""The tables of README.md's "the by-parts phase on one device", from the runs' summary.json files here
(``<run>_seed<s>.json``) and the step times measured interleaved (step_times.json, by step_times.py).

A run's bits/dim after each epoch are deterministic; its seconds are not (this machine's speed drifted by
a third during these runs), so time here is steps x the schedule's step time measured interleaved, in
units of e2e's step. For each run, by parts alone for 12 epochs against e2e of the same seed: the bits/dim
at the end and at equal time, and the by-parts phase's speed to a bits/dim: e2e's time to reach it over
the run's (linear between evaluations; 1.00 = as fast as e2e, "never": not within the 12 epochs).
The row `e2e_lr4e-3` is e2e at lr 4e-3, near the rates the range test finds for the parts
(`pipeline_findlr`): what tuning e2e's own rate gives. A second table sets by parts against e2e at the
same rate, at rates above the config's (sessions 10-11, `PAIRS`). On the averaged weights
(`train.eval_ema`), or with ``raw`` on the raw ones:

    python docs/results/mnist_byparts_one_device/table.py [raw]
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
LEVELS = (3.0, 2.6, 2.4, 2.3)
KEY = "test_bpd" if sys.argv[1:] == ["raw"] else "test_bpd_ema"
RUNS = ["e2e_lr4e-3", "pipeline_feed", "pipeline", "pipeline_findlr", "alternate_every1", "alternate_every25",
        "alternate_every100", "alternate_every400", "alternate_every0"]
# sessions 10-11, commit 020c027: by parts (pipeline + averaged feed) against e2e at the same rate; e2e at 4e-3
# again at that commit (the coupling's logsigmoid changes its rounding, and these rates amplify it), then
# against 9fa2cdf's e2e at 4e-3 of the first table
PAIRS = [("pipeline_feed_lr4e-3", "e2e_lr4e-3_020c027"), ("pipeline_feed_lr8e-3", "e2e_lr8e-3"),
         ("pipeline_feed_lr1.6e-2", "e2e_lr1.6e-2"), ("pipeline_feed_lr4e-3", "e2e_lr4e-3")]
RATIO = json.loads((HERE / "step_times.json").read_text())["ratio_to_e2e"]


def load(name: str, seed: int) -> dict:
    return json.loads((HERE / f"{name}_seed{seed}.json").read_text())


def curve(name: str, run: dict) -> list[tuple[float, float]]:
    """(time in e2e steps, bits/dim) after each epoch; an evaluation whose mean was not finite (None: some
    test image overflowed, or at a high rate the weights overflowed) is left out."""
    schedule = name.split("_")[0]  # e2e, pipeline, alternate
    ratio = RATIO["pipeline_feed" if name.startswith("pipeline_feed") else schedule]
    return [(e["step"] * ratio, e[KEY]) for e in run["history"] if e["kind"] == "eval" and e[KEY] is not None]


def time_to(points: list[tuple[float, float]], level: float) -> float | None:
    """The first moment the bits/dim reach ``level`` (None: never)."""
    if points[0][1] <= level:
        return points[0][0]
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b1 <= level:
            return t0 + (b0 - level) / (b0 - b1) * (t1 - t0)
    return None


def bpd_at(points: list[tuple[float, float]], t: float) -> float:
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return b0 + (t - t0) / (t1 - t0) * (b1 - b0)
    return points[-1][1]


def row(name: str, baseline: str = "e2e") -> str:
    ends, equal, speed = [], [], {level: [] for level in LEVELS}
    for seed in (0, 1):
        e2e, run = curve(baseline, load(baseline, seed)), load(name, seed)
        parts = curve(name, run)
        ends.append(parts[-1][1])
        shorter = min(parts[-1][0], e2e[-1][0])
        equal.append(bpd_at(parts, shorter) - bpd_at(e2e, shorter))
        for level in LEVELS:
            a, b = time_to(e2e, level), time_to(parts, level)
            speed[level].append(f"{a / b:.2f}" if a and b else "never" if a else "-")
    found = "; ".join(", ".join(f"{lr:.1e}" for lr in load(name, seed)["part_lrs"]) for seed in (0, 1))
    lrs = f" (found: {found})" if "findlr" in name else ""
    return (f"| `{name}`{lrs} | {sum(ends) / 2:.3f} ({ends[0]:.3f}, {ends[1]:.3f}) | "
            f"{sum(equal) / 2:+.3f} ({equal[0]:+.3f}, {equal[1]:+.3f}) | "
            + " | ".join(", ".join(speed[level]) for level in LEVELS) + " |")


weights = "raw" if KEY == "test_bpd" else "EMA"
print("step time against e2e's: " + ", ".join(f"{k} {v:.3f}" for k, v in RATIO.items()))
print(f"| run | {weights} bpd after 12 epochs (seed 0, 1) | vs e2e at equal time (seed 0, 1) | "
      + " | ".join(f"speed to {level}" for level in LEVELS) + " |")
print("| --- | --- | --- | " + " | ".join("---" for _ in LEVELS) + " |")
ends = [curve("e2e", load("e2e", s))[-1][1] for s in (0, 1)]
print(f"| `e2e` | {sum(ends) / 2:.3f} ({ends[0]:.3f}, {ends[1]:.3f}) | |" + " |" * len(LEVELS))
for name in RUNS:
    if all((HERE / f"{name}_seed{s}.json").exists() for s in (0, 1)):
        print(row(name))
print("\nby parts against e2e at a named rate (speed: that e2e's time over the run's)")
print(f"| run | against | e2e, {weights} bpd after 12 epochs | run, {weights} bpd after 12 epochs | vs e2e at "
      "equal time | " + " | ".join(f"speed to {level}" for level in LEVELS) + " |")
print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in LEVELS) + " |")
for name, baseline in PAIRS:
    if all((HERE / f"{n}_seed{s}.json").exists() for s in (0, 1) for n in (name, baseline)):
        ends = [curve(baseline, load(baseline, s))[-1][1] for s in (0, 1)]
        print(f"| `{name}` | `{baseline}` | {sum(ends) / 2:.3f} ({ends[0]:.3f}, {ends[1]:.3f})"
              + row(name, baseline)[len(name) + 4:])
