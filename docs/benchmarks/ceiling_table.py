"""Print the ceiling tables of docs/benchmarks.md from bench JSONs (the section on utilisation's ceiling).

    python docs/benchmarks/ceiling_table.py docs/benchmarks/mnist_ceiling_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def run_rows(path: Path) -> list[str]:
    report = json.loads(path.read_text())
    layout = "channels_last" if report["config"]["train"].get("channels_last") else "contiguous"
    rows = []
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"| {path.stem} | {layout} | {r['name']} | failed | | | | |")
            continue
        holders = r["ranks"] if r["kind"] in ("pipeline", "pipelined") else [r]
        floors = "/".join(f"{x['conv_floor_seconds'] * 1000:.0f}" for x in r["ranks"])
        busy = "/".join(f"{x['busy_seconds_per_step'] * 1000:.0f}" for x in r["ranks"])
        of = "/".join(pct(x["utilisation"] / x["ceiling"]) for x in holders)
        util = "/".join(pct(x["utilisation"]) for x in holders)
        ceiling = "/".join(pct(x["ceiling"]) for x in holders)
        rows.append(f"| {path.stem} | {layout} | {r['name']} | {busy} | {floors} | {util} | {ceiling} | {of} |")
    return rows


def convolution_rows(path: Path) -> list[str]:
    """The e2e run's floor, convolution by convolution."""
    report = json.loads(path.read_text())
    (rank,) = next(r for r in report["runs"] if r["name"] == "e2e")["ranks"]
    table, floor = rank["convolutions"], rank["conv_floor_seconds"]
    flops = sum(row["count"] * row["flops_per_s"] * row["seconds"] for row in table)
    out = []
    for row in table:
        n, c, h, w = row["input"]
        o, _, kh, kw = row["weight"]
        share_f = row["count"] * row["flops_per_s"] * row["seconds"] / flops
        out.append(f"| {kh}x{kw}, {c} -> {o} at {h}x{w} | {row['count']} | {row['seconds'] * 1000:.1f} "
                   f"| {row['layout']} | {row['flops_per_s'] / 1e9:.0f} | {share_f:.1%} "
                   f"| {row['count'] * row['seconds'] / floor:.1%} |")
    return out


def main(paths: list[str]) -> None:
    print("| run | layout | mode | busy ms/step | floor ms | util | ceiling | util / ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        print("\n".join(run_rows(Path(p))))
    print()
    print(f"The floor of e2e's convolutions ({Path(paths[0]).stem}):")
    print()
    print("| convolution | per step | ms each (fwd+bwd) | faster layout | GFLOP/s | share of conv FLOPs "
          "| share of floor |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(convolution_rows(Path(paths[0]))))


if __name__ == "__main__":
    main(sys.argv[1:])
