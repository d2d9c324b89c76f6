"""What a training run shows on screen: a rich progress bar, then a closing table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeflow.config import Config


class TrainingDisplay:
    def __init__(self, console: Console, cfg: Config, enabled: bool = True):
        self.console, self.cfg, self.enabled = console, cfg, enabled
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 disable=not enabled)
        self.task = None
        self.last_eval = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def on_step(self, record: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("train", total=None, info="")
        info = (f"{record['phase']} part {record['part']} loss {record['loss']:.3f} "
                f"prefix {record['prefix_bpd']:.3f} bpd")
        self.progress.update(self.task, advance=1 if record["part"] == 0 or record["phase"] != "by_parts" else 0,
                             description=f"epoch {record['epoch'] + 1}", info=info + self.last_eval)

    def on_epoch(self, record: dict) -> None:
        self.last_eval = f" | test {record['test_bpd']:.3f} bpd"
        if self.enabled:
            self.console.log(f"{record['phase']} epoch {record['epoch']}: test {record['test_bpd']:.4f} bits/dim "
                             f"({record['train_seconds']:.1f} s of training)")

    def closing_table(self, summary: dict, out: Path) -> None:
        table = Table(title=f"pipeflow run in {out}")
        for col in ("phase", "schedule", "epochs", "seconds", "test bits/dim"):
            table.add_column(col, justify="right")
        for name, ph in summary["phases"].items():
            bpd = "-" if ph["test_bpd"] is None else f"{ph['test_bpd']:.4f}"
            table.add_row(name, ph["schedule"], str(ph["epochs"]), f"{ph['seconds']:.1f}", bpd)
        table.caption = (f"final test {summary['test_bpd']:.4f} bits/dim; {summary['wall_seconds']:.1f} s wall; "
                         f"{summary['parts']} part(s), skipped steps {summary['skipped_steps']}")
        Console().print(table)
