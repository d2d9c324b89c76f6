"""The run directory: what a run leaves behind for people and for other programs.

    out/config.toml     the resolved config
    out/metrics.jsonl   one JSON object per logged step or evaluation
    out/summary.json    test bits/dim, wall time, per-phase epochs and seconds, ...
    out/model.pt        the full model (see pipeflow.checkpoint)
    out/samples/        sample grids, one per epoch
    out/checkpoints/    per-rank training checkpoints (see pipeflow.checkpoint)
    out/events.out.tfevents.*  the same metrics and grids for TensorBoard (``tensorboard --logdir out``),
                        written when the ``tensorboard`` package is installed (``pip install -e '.[tensorboard]'``)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeflow.checkpoint import atomic_write_bytes, atomic_write_json, config_difference, json_safe
from pipeflow.config import Config, to_toml
from pipeflow.errors import UserError

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "model.pt")
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's


def check_run_dir(out: str | Path, force: bool = False, resume: bool = False) -> list[str]:
    """Refuse to write over another run unless asked to (``--force``) or continuing it (``--resume``).

    Returns the run files already there. Reads only, so every rank may check before any writes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    held = [name for name in (*RUN_FILES, "checkpoints") if (out / name).exists()]
    if held and not (force or resume):
        raise UserError(f"output directory {out} holds another run ({held[0]}); pass --resume auto to continue it "
                        "or --force to replace it")
    return held


def check_same_run(out: str | Path, cfg: Config) -> None:
    """For ``--resume``: refuse a directory whose run has another config (see ``RUN_IDENTITY``)."""
    from pipeflow.config import load_config  # noqa: PLC0415

    path = Path(out) / "config.toml"
    if not path.is_file():
        return
    try:
        theirs = load_config(path)
    except UserError:
        raise UserError(f"{path} is not a valid pipeflow config, so the run in {out} cannot be resumed; "
                        "pass --force to replace it") from None
    difference = config_difference(theirs.to_dict(), cfg)
    if difference:
        raise UserError(f"output directory {out} holds a run with another config ({difference}); "
                        "resume it with its own config, or pass --force to replace it")


def finished_summary(out: str | Path) -> dict | None:
    """The summary of a run that finished in ``out`` (None if it never did)."""
    path = Path(out) / "summary.json"
    if not path.is_file() or not (Path(out) / "model.pt").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def prepare_run_dir(out: str | Path, force: bool = False, resume: bool = False) -> Path:
    """Check ``out`` (see :func:`check_run_dir`); with ``force``, clear the old run's files.

    With ``resume`` the directory is reused as it is (the caller has checked it is the same run).
    """
    out = Path(out)
    held = check_run_dir(out, force, resume)
    if held and force and not resume:
        for name in (*RUN_FILES, "samples", "checkpoints"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for events in out.glob(EVENT_FILES):
            events.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def tensorboard_writer(out: Path, purge_step: int | None = None):
    """A TensorBoard ``SummaryWriter`` into ``out``, or None where the ``tensorboard`` package is missing.

    ``purge_step``: resuming, TensorBoard hides what an earlier attempt logged from this step on
    (the resumed run logs those steps again).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (imports tensorboard)
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out), purge_step=purge_step)


def tensorboard_scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The TensorBoard scalars of one ``metrics.jsonl`` record, as (tag, value).

    Tags are metric/phase[/part]: a step's loss, prefix bits/dim, learning rate and images/s per part; an
    evaluation's test bits/dim and each part's test prefix bits/dim.
    """
    phase = record.get("phase", "run")
    if record.get("kind") == "step":
        pairs = [(f"{name}/{phase}/part{record.get('part', 0)}", record.get(name))
                 for name in ("loss", "prefix_bpd", "lr", "images_per_s")]
    elif record.get("kind") == "eval":
        pairs = [(f"test_bpd/{phase}", record.get("test_bpd"))]
        pairs += [(f"test_prefix_bpd/{phase}/part{k}", v) for k, v in enumerate(record.get("test_prefix_bpd") or [])]
    else:
        return []
    return [(tag, float(v)) for tag, v in pairs if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _last_step(metrics: Path) -> int:
    """The largest step recorded in ``metrics.jsonl`` (-1 if none)."""
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()]
    return max((s for s in steps if isinstance(s, int)), default=-1)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Samples (centred on 0) as pixel intensities in [0, 1]. A sample the inverse flow overflowed (early in
    training, the exponentials of its couplings can reach inf, then nan) is drawn saturated, or grey for nan,
    instead of being cast to arbitrary bytes."""
    return (torch.nan_to_num(images.float().cpu(), nan=0.0) + 0.5).clamp(0, 1)


class RunLog:
    """The one writer of a run's metrics: ``metrics.jsonl``, sample grids, ``summary.json``, and TensorBoard's files."""

    def __init__(self, out: Path, cfg: Config, metrics_bytes: int | None = None):
        """``metrics_bytes``: resuming, keep only that much of ``metrics.jsonl`` (what the checkpoint had logged)."""
        self.out = Path(out)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out / "config.toml", to_toml(cfg).encode())
        self._metrics = open(self.out / "metrics.jsonl", "a")
        resuming = metrics_bytes is not None
        if resuming:
            self._metrics.truncate(min(metrics_bytes, self._metrics.tell()))
            self._metrics.seek(0, 2)
        self._step = _last_step(self.out / "metrics.jsonl") if resuming else -1  # the step of the latest record
        self._tensorboard = tensorboard_writer(self.out, purge_step=self._step + 1 if resuming else None)

    def tell(self) -> int:
        """Bytes of ``metrics.jsonl`` written so far (saved in checkpoints)."""
        return self._metrics.tell()

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # strict JSON lines
        self._metrics.flush()
        self._step = record.get("step", self._step)
        if self._tensorboard is not None:
            for tag, value in tensorboard_scalars(record):
                self._tensorboard.add_scalar(tag, value, self._step)
            if record.get("kind") == "eval":
                self._tensorboard.flush()  # one epoch at a time, for a TensorBoard watching the run

    def summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.out / "summary.json", summary)

    def samples(self, images: torch.Tensor, name: str) -> Path:
        """A grid of ``images`` as ``samples/NAME.png`` (and in TensorBoard, by phase, at the latest step).

        ``name`` is ``PHASE_epochNNN``: TensorBoard shows the grids of a phase as one series.
        """
        from torchvision.utils import make_grid, save_image  # noqa: PLC0415

        path = self.out / "samples" / f"{name}.png"
        grid = make_grid(pixels(images), nrow=max(1, int(len(images) ** 0.5)))
        save_image(grid, path)
        if self._tensorboard is not None:
            self._tensorboard.add_image(f"samples/{name.rsplit('_epoch', 1)[0]}", grid, max(self._step, 0))
        return path

    def close(self) -> None:
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
