"""The figures of README.md's 36-epoch one-device comparison, from the two seeds' compare.json:

    python docs/results/mnist_alt36/table.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
for s in (0, 1):
    d = json.load(open(f"{HERE}/seed{s}/compare.json"))
    runs = d["runs"]
    for name in ("e2e", "alternate2"):
        r = runs[name]
        ev = [e for e in r["history"] if e["kind"] == "eval"]
        print(s, name, "raw %.4f ema %.4f train_s %.1f cpu %.1f" % (r["test_bpd"], r.get("test_bpd_ema") or ev[-1].get("test_bpd_ema"), r["train_seconds"], r.get("cpu_seconds", 0)))
    e2e = [e for e in runs["e2e"]["history"] if e["kind"] == "eval"]
    alt = [e for e in runs["alternate2"]["history"] if e["kind"] == "eval"]
    T = alt[-1]["train_seconds"]
    # e2e's EMA at alternate2's final time (linear interpolation)
    for a, b in zip(e2e, e2e[1:]):
        if a["train_seconds"] <= T <= b["train_seconds"]:
            f = (T - a["train_seconds"]) / (b["train_seconds"] - a["train_seconds"])
            print("   e2e EMA at alt's end time %.0f s: %.4f (alt %.4f)" % (T, a["test_bpd_ema"] + f * (b["test_bpd_ema"] - a["test_bpd_ema"]), alt[-1]["test_bpd_ema"]))
    bp = [e for e in alt if e["phase"] == "by_parts"][-1]
    print("   end of by parts: epoch %d, %.0f s, EMA %.4f; e2e epoch 24 EMA %.4f at %.0f s" % (bp["epoch"], bp["train_seconds"], bp["test_bpd_ema"], e2e[23]["test_bpd_ema"], e2e[23]["train_seconds"]))
    # e2e gain over its last 30 % of time
    T0 = 0.7 * e2e[-1]["train_seconds"]
    prev = max((e for e in e2e if e["train_seconds"] <= T0), key=lambda e: e["train_seconds"])
    print("   e2e EMA gain over last 30%%: %.4f (from %.4f at %.0f s)" % (prev["test_bpd_ema"] - e2e[-1]["test_bpd_ema"], prev["test_bpd_ema"], prev["train_seconds"]))
    # time for by-parts phase to reach bpd levels vs e2e
    for level in (3.0, 2.6, 2.4):
        te = next((e["train_seconds"] for e in e2e if e["test_bpd_ema"] <= level), None)
        ta = next((e["train_seconds"] for e in alt if e["phase"] == "by_parts" and e["test_bpd_ema"] <= level), None)
        print("   reach EMA %.1f: e2e %s s, by-parts phase %s s" % (level, te and round(te), ta and round(ta)))
