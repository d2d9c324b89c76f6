"""What a training run shows on screen: a rich progress bar, then a closing table.

Every rich Console of pipeflow comes from :func:`make_console`, so that output to a file, a pipe
or a CI log shows whole figures and plain lines.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeflow.config import Config
from pipeflow.loop import PhaseName

UNBOUNDED_WIDTH = 100_000  # columns of a Console that writes to no terminal: wide enough for any table


def make_console(stderr: bool = False, min_width: int = 0) -> Console:
    """A rich Console on stdout (or stderr) that never cuts a figure short.

    On a terminal, rich fits tables to the terminal's width (at least ``min_width``). Elsewhere rich
    would assume 80 columns and cut a wide table's numbers to "9,340,6…"; there the width is
    unbounded and lines are not wrapped: each table is as wide as its content, each line one line.
    Log lines never carry rich's source-path column (``progress.py:41``): it is pipeflow's, not the user's.
    """
    console = Console(stderr=stderr, log_path=False)
    if console.is_terminal:
        console.width = max(console.width, min_width)
    else:
        console.width, console.soft_wrap = UNBOUNDED_WIDTH, True
    return console


def log_line(console: Console, text: str) -> None:
    """One timestamped line: rich's log on a terminal; elsewhere plain, not padded to the console's width."""
    if console.is_terminal:
        console.log(text)
    else:
        console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False)


class TrainingDisplay:
    """A live bar on a terminal and one line per evaluation; in a file or a CI log, only the lines."""

    def __init__(self, console: Console, cfg: Config, enabled: bool = True):
        self.console, self.cfg, self.enabled = console, cfg, enabled
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 disable=not (enabled and console.is_terminal))
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
        first = record["part"] == 0 or record["phase"] != PhaseName.BY_PARTS  # one advance per step
        self.progress.update(self.task, advance=1 if first else 0, description=f"epoch {record['epoch'] + 1}",
                             info=info + self.last_eval)

    def on_epoch(self, record: dict) -> None:
        self.last_eval = f" | test {record['test_bpd']:.3f} bpd"
        if self.enabled:
            bad = record.get("test_nonfinite")
            log_line(self.console, f"{record['phase']} epoch {record['epoch']}: test {record['test_bpd']:.4f} "
                                   f"bits/dim ({record['train_seconds']:.1f} s of training)"
                                   + (f"; {bad} test images gave no finite bits/dim" if bad else ""))

    def closing_table(self, summary: dict, out: Path) -> None:
        table = Table(title=f"pipeflow run in {out}")
        for col in ("phase", "schedule", "epochs", "seconds", "test bits/dim"):
            table.add_column(col, justify="right")
        for name, ph in summary["phases"].items():
            bpd = "-" if ph["test_bpd"] is None else f"{ph['test_bpd']:.4f}"
            table.add_row(name, ph["schedule"], str(ph["epochs"]), f"{ph['seconds']:.1f}", bpd)
        table.caption = (f"final test {summary['test_bpd']:.4f} bits/dim; {summary['wall_seconds']:.1f} s wall; "
                         f"{summary['parts']} part(s), skipped steps {summary['skipped_steps']}")
        make_console().print(table)
