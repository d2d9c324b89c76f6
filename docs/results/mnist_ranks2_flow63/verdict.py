"""Issue 14's target 2 from the six comparisons in this folder (run in the order of their numbers).

By parts (6 epochs, `flow` head) + 3 of DDP fine-tuning on 2 ranks against 12 epochs of DDP on the same
2 ranks and of one device, unthrottled and at 10 MB/s. compare applies one budget to every run of an
invocation, so the budgets were run as separate invocations, ordered A B B A over the seeds by hand
(1-6). The unthrottled clause against one device was then timed once more, B A A B (7-9): the same runs,
so the same bits/dim, new seconds.

    python docs/results/mnist_ranks2_flow63/verdict.py
"""

import json
from pathlib import Path
from statistics import mean

HERE = Path(__file__).parent


def runs(folder: str) -> dict:
    return json.loads((HERE / folder / "compare.json").read_text())["runs"]


def pick(name: str, *folders: str) -> list[dict]:
    """Seed 0's run then seed 1's."""
    found = [r for folder in folders for r in runs(folder).values() if r["name"] == name]
    return sorted(found, key=lambda r: r["seed"])


def row(label: str, rs: list[dict]) -> dict:
    figures = {key: mean(r[key] for r in rs) for key in ("test_bpd", "test_bpd_ema", "train_seconds")}
    seeds = ", ".join(f"{r['test_bpd_ema']:.3f}" for r in rs)
    print(f"| {label} | {figures['test_bpd_ema']:.4f} ({seeds}) | {figures['test_bpd']:.4f} | "
          f"{figures['train_seconds']:.1f} |")
    return figures


print("| run | EMA bpd (seed 0, 1) | raw bpd | training s |\n| --- | ---: | ---: | ---: |")
e2e = row("e2e, one device, 12 epochs", pick("e2e", "1_base_seed0", "3_base_seed1"))
ddp = row("ddp2, 12 epochs", pick("ddp2", "1_base_seed0", "3_base_seed1"))
parts = row("pipeline2-ddp, flow head, 6 + 3 epochs", pick("pipeline2-ddp", "2_flow63"))
ddp_slow = row("ddp2 at 10 MB/s", pick("ddp2", "4_10MBps_ddp_seed0", "6_10MBps_ddp_seed1"))
parts_slow = row("pipeline2-ddp at 10 MB/s", pick("pipeline2-ddp", "5_10MBps_flow63"))

gap = parts["test_bpd_ema"] - ddp["test_bpd_ema"]
print(f"\nbits/dim against DDP (EMA): {gap:+.4f} (target: within 0.02)")
print(f"time against DDP at 10 MB/s: {parts_slow['train_seconds'] / ddp_slow['train_seconds']:.3f}x (target <= 0.8)")
print(f"time against one device, unthrottled: {parts['train_seconds'] / e2e['train_seconds']:.3f}x (target <= 0.6)")
print(f"time against DDP, unthrottled: {parts['train_seconds'] / ddp['train_seconds']:.3f}x")

again = {"e2e": pick("e2e", "8_again_e2e"),
         "parts": pick("pipeline2-ddp", "7_again_flow63_seed0", "9_again_flow63_seed1")}
second = mean(r["train_seconds"] for r in again["parts"]) / mean(r["train_seconds"] for r in again["e2e"])
both = (mean(r["train_seconds"] for r in again["parts"] + pick("pipeline2-ddp", "2_flow63"))
        / mean(r["train_seconds"] for r in again["e2e"] + pick("e2e", "1_base_seed0", "3_base_seed1")))
print(f"timed again (7-9): e2e {mean(r['train_seconds'] for r in again['e2e']):.1f} s, by parts "
      f"{mean(r['train_seconds'] for r in again['parts']):.1f} s: {second:.3f}x; both timings pooled: {both:.3f}x")
