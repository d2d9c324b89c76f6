"""The table of README.md's "by parts alone on 2 ranks, every option" from the compare.json files here:
each option's final bits/dim (averaged weights and raw), its training seconds, and its bits/dim at equal
wall-clock with its DDP of the same seed (the shorter run's last second; linear between evaluations): DDP at
lr 1e-3, except where a DDP was timed again beside the run (``BASELINE``).

    python docs/results/ranks2_byparts_options/table.py [fashion]
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
PREFIX = "fashion_" if sys.argv[1:] == ["fashion"] else ""


def runs(name: str) -> dict:
    d = json.loads((HERE / f"{PREFIX}{name}" / "compare.json").read_text())
    return {k.rsplit("-seed", 1)[1]: r for k, r in d["runs"].items()}


def ema_at(run: dict, seconds: float) -> float:
    pts = [(e["train_seconds"], e["test_bpd_ema"]) for e in run["history"] if e["kind"] == "eval"]
    if seconds >= pts[-1][0]:
        return pts[-1][1]
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t0 <= seconds <= t1:
            return b0 + (seconds - t0) / (t1 - t0) * (b1 - b0)
    raise ValueError(seconds)


# the runs of sessions 5 and 6 against DDP timed again beside them (the machine's speed drifts between
# sessions); Fashion-MNIST's position and conditional against session 4's DDP
AGAIN = "ddp_lr1e-3_again"
BASELINE = {"learned": AGAIN, "flow_feed_lr4e-3": "ddp_lr4e-3_again"}
print("| run | EMA bpd (seed 0, 1) | raw (seed 0, 1) | train s | vs its DDP, at the end | at equal wall-clock |")
print("| --- | --- | --- | --- | ---: | ---: |")
names = ["ddp_lr1e-3", "ddp_lr4e-3", AGAIN, "ddp_lr4e-3_again", "flow_feed", "flow_findlr", "position",
         "conditional", "learned", "flow_feed_lr4e-3"]
for name in [n for n in names if (HERE / f"{PREFIX}{n}").exists()]:
    ddp = runs(BASELINE.get(name, "ddp_lr1e-3"))
    rs = runs(name)
    ema = [rs[s]["test_bpd_ema"] for s in ("0", "1")]
    raw = [rs[s]["test_bpd"] for s in ("0", "1")]
    secs = [rs[s]["train_seconds"] for s in ("0", "1")]
    end = sum(ema) / 2 - sum(ddp[s]["test_bpd_ema"] for s in ("0", "1")) / 2
    equal = []
    for s in ("0", "1"):
        t = min(rs[s]["train_seconds"], ddp[s]["train_seconds"])
        equal.append(ema_at(rs[s], t) - ema_at(ddp[s], t))
    print(f"| {name} | {sum(ema) / 2:.3f} ({ema[0]:.3f}, {ema[1]:.3f}) "
          f"| {sum(raw) / 2:.3f} ({raw[0]:.3f}, {raw[1]:.3f}) | {secs[0]:.1f}, {secs[1]:.1f} "
          f"| {end:+.3f} | {sum(equal) / 2:+.3f} ({equal[0]:+.3f}, {equal[1]:+.3f}) |")
