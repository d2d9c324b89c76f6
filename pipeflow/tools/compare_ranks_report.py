"""The report of :func:`pipeflow.tools.compare_ranks.compare_ranks`: compare.json, report.md and one plot.

Everything in report.md is drawn from the results dict, which compare.json holds whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeflow.checkpoint import atomic_write_bytes, json_safe
from pipeflow.tools.compare import CLAIM_BPD, _f, _pyplot
from pipeflow.tools.compare_ranks import verdict

COLORS = {"e2e": "black", "ddp": "tab:red", "pipeline": "tab:green"}
MODE_STYLE = {None: "-", "ddp": "-", "rank0": ":", "pipeline": "--"}


def write_report(results: dict, out: Path, final: bool) -> None:
    """compare.json and report.md (and, at the end, the plot) from what has been measured so far."""
    results["verdict"] = verdict(results)
    results["complete"] = final
    if final:
        results["plots"] = _plot(results, out)
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)
    atomic_write_bytes(out / "compare.json", (text + "\n").encode())
    atomic_write_bytes(out / "report.md", render(results).encode())


def render(results: dict) -> str:
    return "\n".join(_header(results) + _verdict_lines(results) + _runs_table(results) + _plots(results)
                     + _caveats(results))


def _header(results: dict) -> list[str]:
    cfg, p = results["config"], results["ranks"]
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    lines = [f"# By parts on {p} ranks against DDP on {p} ranks and one device", ""]
    if not results.get("complete"):
        lines += ["**Incomplete**: still running or interrupted; the same command continues it.", ""]
    data = d["path"] if d["dataset"] == "npz" else d["dataset"]
    link = f"{results['bandwidth']:,.0f} B/s for the pipeline's sends" if results["bandwidth"] else "unthrottled"
    ema = f"; an EMA of the weights evaluated too (decay {t['eval_ema']})" if t.get("eval_ema") else ""
    lines += [f"**Setting:** data `{data}`; Glow L={m['levels']} K={m['steps']} hidden={m['hidden']}; "
              f"global batch {t['batch_size']}, lr {t['lr']}, {t['by_parts_epochs']} epochs by parts + "
              f"{t['finetune_epochs']} fine-tuning (DDP and one device: {t['by_parts_epochs'] + t['finetune_epochs']} "
              f"end to end), {t['steps_per_epoch'] or 'all'} steps per epoch; seeds {results['seeds']}; "
              f"{results['threads_per_rank']} thread(s) per rank, {results['one_device_threads']} on one device; "
              f"link {link}{ema}.", "",
              "Run order (A B B A over the seeds): " + " ".join(f"`{k}`" for k in results["order"]) + ".", ""]
    if results.get("command"):
        lines += ["Reproduce with:", "", "```bash", results["command"], "```", ""]
    return lines


def _verdict_lines(results: dict) -> list[str]:
    table = results["verdict"]
    if not table:
        return ["## Verdict", "", "No run has finished yet.", ""]
    lines = ["## Verdict", "",
             "Means over the seeds. *At equal wall-clock*: each run's test bits/dim after as many training seconds as "
             "the fastest run of its seed took in all (linear between evaluations).", "",
             "| run | final bpd | final bpd (EMA) | train s | CPU s | bpd at equal wall-clock | vs DDP: bpd, time | "
             "vs one device: bpd, time |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, row in table.items():
        lines.append("| " + " | ".join([
            name, _f(row["test_bpd"]), _f(row["test_bpd_ema"]), _f(row["train_seconds"], "{:.1f}"),
            _f(row["cpu_seconds"], "{:.1f}"),
            f"{_f(row['bpd_at_equal_seconds'])} at {_f(row['equal_seconds'], '{:.1f}')} s",
            _against(row.get("vs_ddp")), _against(row.get("vs_e2e"))]) + " |")
    lines += ["", f"*held*: final bits/dim within {CLAIM_BPD} of the baseline in at most "
              "0.8 of DDP's or 0.6 of one device's training seconds (the issue's target 2).", ""]
    return lines


def _against(v: dict | None) -> str:
    if not v:
        return "-"
    equal = v["bpd_diff_at_equal_seconds"]
    at_equal = "" if equal is None else f" (at equal wall-clock {equal:+.4f})"
    held = "**held**" if v["held"] else "not held"
    return f"{v['bpd_diff']:+.4f}, {_f(v['time_ratio'], '{:.2f}')}x{at_equal} {held}"


def _runs_table(results: dict) -> list[str]:
    lines = ["## Every run", "",
             "| # | run | seed | start | final bpd | EMA bpd | train s | process wall s | CPU s | images | exit |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, e in results["runs"].items():
        lines.append("| " + " | ".join([
            str(e["position"] + 1), key, str(e["seed"]), e["start"], _f(e.get("test_bpd")), _f(e.get("test_bpd_ema")),
            _f(e.get("train_seconds"), "{:.1f}"), _f(e.get("process_wall_seconds"), "{:.1f}"),
            _f(e.get("cpu_seconds"), "{:.1f}"), _f(e.get("images"), "{:,}"),
            "ok" if "error" not in e else f"failed: {e['error'][:80]}"]) + " |")
    lines += ["", "*train s*: training steps only (the slowest rank; no evaluation, sampling or start-up). "
              "*process wall s*: the whole command. *CPU s*: user + system time of every process the command "
              "started (`getrusage` of the children), start-up and evaluation included.", ""]
    commands = [(k, e["command"]) for k, e in results["runs"].items() if e.get("command")]
    if commands:
        lines += ["Each run's command (the config each names is written beside its run directory):", "", "```bash"]
        lines += [f"# {k}\n{c}" for k, c in commands] + ["```", ""]
    return lines


def _plots(results: dict) -> list[str]:
    if not results.get("plots"):
        return []
    return ["## Curves", "", "Test bits/dim against training seconds and against images seen; every run, "
            "every seed (a mark per evaluation).", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]


def _caveats(results: dict) -> list[str]:
    lines = ["## What the figures leave out", ""]
    if results["bandwidth"]:
        lines.append(f"- Every rank's link is throttled to {results['bandwidth']:,.0f} B/s for the pipeline's forward "
                     "sends and DDP's all-reduces (by parts and DDP alike); not for the one-off gather of the parts, "
                     "the replicas' gradient average within a stage, nor pipelined fine-tuning's sends.")
    lines += ["- The by-parts phase's evaluation is the pipeline's own (stage by stage, each stage on its own "
              "average for the EMA figure); in a by-parts run, fine-tuning's average starts again with the phase.",
              "- A resumed run's CPU seconds cover its last attempt only (`cpu_covers_last_attempt_only`).",
              f"- Load average when the comparison started: {results['load'].get('start')}, at its end: "
              f"{results['load'].get('end', '-')} ({results['machine']['cpus']} CPUs).", ""]
    return lines


def _plot(results: dict, out: Path) -> list[str]:
    plt = _pyplot()
    runs = [e for e in results["runs"].values() if e.get("history")]
    if plt is None or not runs:
        return []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    for ax, key, label in zip(axes, ("train_seconds", "images"), ("training wall-clock (s)", "images seen")):
        for e in runs:
            color = COLORS.get(e["kind"], "tab:gray")
            alpha = 1.0 if e["seed"] == results["seeds"][0] else 0.5
            ax.plot([r[key] for r in e["history"]], [r["test_bpd"] for r in e["history"]], MODE_STYLE.get(
                e.get("finetune"), "-"), color=color, alpha=alpha, marker=".", label=f"{e['name']} s{e['seed']}")
        ax.set_xlabel(label)
        ax.set_ylabel("test bits/dim")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"by parts on {results['ranks']} ranks, DDP on {results['ranks']} ranks, one device", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "plots" / "bpd.png")
    plt.close(fig)
    return ["plots/bpd.png"]
