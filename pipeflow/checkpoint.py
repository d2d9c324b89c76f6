"""Files that must never be half-written: model files and checkpoints.

Every write goes to a temporary file in the same directory, is fsync'ed, then renamed
over the target, so a crash leaves either the old file or the new one, never a torn one.

Training checkpoints live in the run directory, one folder per rank:

    out/checkpoints/rank{r}/step-000000120.pt    what rank r needs to continue after step 120
    out/checkpoints/rank{r}/manifest.json        the steps rank r has completed and saved, oldest first

A checkpoint is written first, then the manifest that lists it, then the oldest ones beyond
``checkpoint.keep`` are deleted: a crash at any point leaves a manifest whose every entry is
a whole file. ``--resume auto`` continues from the newest step that every rank has saved
(see :mod:`pipeflow.multirank` and :func:`pipeflow.train.train`).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeflow.config import Config, from_dict
from pipeflow.errors import UserError

MODEL_FORMAT = "pipeflow.model/1"
CHECKPOINT_FORMAT = "pipeflow.checkpoint/1"
MANIFEST_FORMAT = "pipeflow.manifest/1"

# What makes two configs the same run: resuming under a config that differs in any of these
# would continue a different experiment, so it is refused. The rest (threads, device, learning
# rates, warm-up, clipping, logging, timeouts, checkpointing) may change between attempts; a
# run resumed with the same values ends with the parameters of an uninterrupted one.
RUN_IDENTITY = {
    "model": None,  # every key
    "data": ("dataset", "path", "n_bits", "levels", "train_limit", "test_limit"),
    "parts": None,
    "train": ("schedule", "by_parts_epochs", "finetune_epochs", "batch_size", "optimizer", "alternate_every",
              "steps_per_epoch", "seed", "feed_ema"),
    "distributed": ("finetune",),
}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def json_safe(obj: Any) -> Any:
    """Non-finite numbers (a diverged evaluation gives inf) as null, so that files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def save_model(path: str | Path, model: torch.nn.Module, cfg: Config, n_bins: int, extra: dict | None = None) -> None:
    """The full model, loadable alone: its config travels with its weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": MODEL_FORMAT, "config": cfg.to_dict(), "input_shape": list(model.input_shape),
                       "n_bins": n_bins, "state_dict": state, **(extra or {})}, path)


def read_checkpoint(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip, unpickling refused: all mean a bad file
        raise UserError(f"checkpoint {path} is corrupt or not a pipeflow file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != expected_format:
        found = blob.get("format") if isinstance(blob, dict) else None
        hint = ""
        if found == CHECKPOINT_FORMAT and expected_format == MODEL_FORMAT:
            hint = ("; it is a training checkpoint of one rank: use the run directory's model.pt, "
                    "or continue the run with --resume auto")
        elif found == MODEL_FORMAT and expected_format == CHECKPOINT_FORMAT:
            hint = "; it is a finished model (model.pt), not a training checkpoint"
        raise UserError(f"checkpoint {path} is not a {expected_format} file{hint}")
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Return ``(model, cfg, n_bins)`` from a file written by :func:`save_model`."""
    from pipeflow.build import build_model  # noqa: PLC0415 (keeps this module free of model imports at load)

    blob = read_checkpoint(path, MODEL_FORMAT)
    cfg = from_dict(blob["config"])
    model = build_model(cfg, tuple(blob["input_shape"]))  # the run's architecture and layout
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match its own config: {str(exc).splitlines()[0]}") from None
    return model.to(device), cfg, int(blob["n_bins"])


def config_difference(saved: dict, cfg: Config) -> str | None:
    """The first run-identity key (see ``RUN_IDENTITY``) on which ``saved`` (a config dict) and ``cfg`` differ."""
    now = cfg.to_dict()
    for section, keys in RUN_IDENTITY.items():
        mine, theirs = now.get(section, {}), saved.get(section, {}) if isinstance(saved, dict) else {}
        for key in keys or mine:
            if key in mine and theirs.get(key, mine[key]) != mine[key]:
                return f"{section}.{key} = {theirs.get(key)!r} there, {mine[key]!r} here"
    return None


def rng_state(device: torch.device | None = None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointStore:
    """One rank's checkpoints: atomic files, a manifest listing them, the newest ``keep`` kept."""

    def __init__(self, out: str | Path, rank: int, keep: int):
        self.dir = Path(out) / "checkpoints" / f"rank{rank}"
        self.manifest_path = self.dir / "manifest.json"
        self.rank, self.keep = rank, keep

    @staticmethod
    def file_name(step: int) -> str:
        return f"step-{step:09d}.pt"

    def entries(self) -> list[dict]:
        """The manifest's entries, oldest first: ``{"step", "phase", "file", "world", ...}``."""
        if not self.manifest_path.exists():
            return []
        try:
            manifest = json.loads(self.manifest_path.read_text())
            entries = manifest["checkpoints"]
            if manifest.get("format") != MANIFEST_FORMAT or not all(isinstance(e["step"], int) for e in entries):
                raise ValueError("not a manifest")
        except (ValueError, KeyError, TypeError, OSError):
            raise UserError(f"checkpoint manifest {self.manifest_path} is corrupt; "
                            "pass --force to start the run afresh") from None
        return entries

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write_json(self.manifest_path, {"format": MANIFEST_FORMAT, "rank": self.rank, "checkpoints": entries})

    def save(self, step: int, phase: str, blob: dict, **meta: Any) -> Path:
        """Write ``blob`` as the checkpoint of ``step``, list it, then drop the oldest beyond ``keep``."""
        path = self.dir / self.file_name(step)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": step, "phase": phase, "rank": self.rank, **blob}, path)
        entries = [e for e in self.entries() if e["step"] != step]
        entries.append({"step": step, "phase": phase, "file": path.name, **meta})
        entries.sort(key=lambda e: e["step"])
        kept, dropped = entries[-self.keep :], entries[: -self.keep]
        self._write_manifest(kept)
        for e in dropped:
            (self.dir / e["file"]).unlink(missing_ok=True)
        return path

    def discard_after(self, step: int) -> None:
        """Forget checkpoints newer than ``step`` (written by an attempt that is being resumed from ``step``)."""
        entries = self.entries()
        newer = [e for e in entries if e["step"] > step]
        if newer:
            self._write_manifest([e for e in entries if e["step"] <= step])
            for e in newer:
                (self.dir / e["file"]).unlink(missing_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # torn writes of a killed attempt
            tmp.unlink(missing_ok=True)

    def load(self, step: int, cfg: Config | None = None) -> dict:
        """The checkpoint of ``step``; refused if corrupt or (given ``cfg``) from another run."""
        entry = next((e for e in self.entries() if e["step"] == step), None)
        if entry is None:
            raise UserError(f"{self.dir} holds no checkpoint of step {step}")
        path = self.dir / entry["file"]
        blob = read_checkpoint(path, CHECKPOINT_FORMAT)
        if blob.get("step") != step or blob.get("rank") != self.rank:
            raise UserError(f"checkpoint {path} is not rank {self.rank}'s step {step}")
        if cfg is not None:
            difference = config_difference(blob.get("config", {}), cfg)
            if difference:
                raise UserError(f"checkpoint {path} belongs to a run with another config ({difference}); "
                                "resume with that run's config, or pass --force to start afresh")
        return blob
