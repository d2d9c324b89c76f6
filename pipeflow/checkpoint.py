"""Files that must never be half-written: model files and checkpoints.

Every write goes to a temporary file in the same directory, is fsync'ed, then renamed
over the target, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeflow.config import Config, from_dict
from pipeflow.errors import UserError

MODEL_FORMAT = "pipeflow.model/1"


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


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
        raise UserError(f"checkpoint {path} is not a {expected_format} file")
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Return ``(model, cfg, n_bins)`` from a file written by :func:`save_model`."""
    from pipeflow.glow import Glow  # noqa: PLC0415 (keeps this module free of model imports at load)

    blob = read_checkpoint(path, MODEL_FORMAT)
    cfg = from_dict(blob["config"])
    c, size, _ = blob["input_shape"]
    m = cfg.model
    model = Glow(c, size, m.levels, m.steps, m.hidden, m.coupling, m.lu)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match its own config: {str(exc).splitlines()[0]}") from None
    return model.to(device), cfg, int(blob["n_bins"])
