"""Configuration as data: TOML -> dataclasses, validated once, overridable from the command line.

    cfg = load_config("configs/demo.toml", overrides=["train.lr=3e-4", "parts.count=3"])

The defaults are a run on the default data set, scikit-learn's bundled 8x8 digits: a Glow sized
for it, in 2 parts on one device and one part per process under ``pipeflow.launch``, which
finishes in a few minutes on 2 CPU cores. The paper's model is configs/cifar10_glow.toml.

Unknown sections or keys, values of the wrong type and values out of range are all
:class:`~pipeflow.errors.UserError` with one line that names the key. Nothing downstream
parses strings or reads the environment: it receives a validated :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeflow.errors import UserError


@dataclass
class ModelConfig:
    levels: int = 3  # L: levels, each [squeeze, K steps, split] (no split after the last)
    steps: int = 8  # K: flow steps per level
    hidden: int = 64  # channels of the coupling networks (the paper's CIFAR-10 model: K = 32, 512)
    coupling: str = "affine"  # affine | additive
    lu: bool = True  # LU-decomposed 1x1 convolutions


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | npz | mnist | fashion_mnist | cifar10
    path: str = ""  # the .npz file for dataset = "npz"
    root: str = "~/.cache/pipeflow"  # where torchvision datasets live
    download: bool = False  # let torchvision download a missing dataset
    # grey levels of the stored images; 0: what the data says (an npz's `levels` field; the digits 17),
    # else 256 for uint8 images. Never guessed from the pixels: a dark 8-bit image has 256.
    levels: int = 0
    n_bits: int = 0  # reduce to 2^n_bits levels per pixel; 0 keeps the data's own levels
    train_limit: int = 0  # use only the first N training images (0: all)
    test_limit: int = 0  # use only the first N test images (0: all)


@dataclass
class PartsConfig:
    count: int = 0  # P; 0 (left out): one part per process, see parts_count
    scheme: str = "across"  # blocks | across | cuts | balanced
    cuts: list[int] = field(default_factory=list)  # for scheme = "cuts": flow steps before each cut
    # standard (N(0, I)) | learned (per-channel Gaussian) | position (per channel and position) |
    # conditional (Glow's split prior) | flow (a small auxiliary flow head); see pipeflow.priors.
    # flow: it beat standard in every comparison made (docs/results/priors.md)
    boundary_prior: str = "flow"


@dataclass
class TrainConfig:
    schedule: str = "alternate"  # e2e | pipeline | alternate | sequential
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    by_parts_epochs: int = 30  # the paper's CIFAR-10 plan: 60 by parts, then 30 end to end
    finetune_epochs: int = 15
    batch_size: int = 48  # shared out evenly by 2, 3, 4, 6 or 8 data-parallel processes
    eval_batch_size: int = 256
    lr: float = 1e-3
    part_lrs: list[float] = field(default_factory=list)  # one per part; empty: lr for every part
    # > 0: find each part's rate before training by a range test over this many batches (pipeflow.lr_find)
    find_lr_steps: int = 0
    finetune_lr: float = 0.0  # 0: lr
    # carry: fine-tuning continues the parts' optimiser moments, with no second warm-up;
    # fresh: a new optimiser, warmed up again from zero
    finetune_optimizer: str = "carry"
    optimizer: str = "adam"  # adam | adamax
    warmup_steps: int = 100  # linear lr warm-up, counted per optimiser
    # constant | cosine: every rate times (1 + cos(pi t)) / 2, t the fraction of the run's steps done
    # before this step (by parts and fine-tuning together): it falls to 0 at the run's end
    lr_schedule: str = "constant"
    grad_clip: float = 50.0  # max gradient norm; 0 disables clipping
    alternate_every: int = 1  # alternate: steps per turn; 0 means one epoch per turn
    # pipeline and alternate: part k+1 trains on the output of an exponential moving average of part k's
    # weights with this decay (e.g. 0.999); 0: on part k's own output (see pipeflow.feed)
    feed_ema: float = 0.0
    steps_per_epoch: int = 0  # cap on steps per epoch (0: the whole training set)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    log_every: int = 10
    samples: int = 64  # sample grid size
    temperature: float = 0.7
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    compile: bool = False  # torch.compile each part's training step (forward + objective); minutes on a CPU
    # convolution weights, and so the activations, in NHWC (channels_last): faster convolutions on a CPU
    channels_last: bool = False
    eval_ema: float = 0.0  # 0 < d < 1: also evaluate an EMA of the weights (decay d), see pipeflow.averaging

    @property
    def run_epochs(self) -> int:
        """The whole run's epochs: by parts and fine-tuning, or the e2e baseline's (which trains as long)."""
        return self.by_parts_epochs + self.finetune_epochs


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    in_flight: int = 2  # batches a stage may send ahead of its receiver
    timeout_s: float = 300.0  # a silent peer is an error after this long
    # ddp: data-parallel on every rank | rank0: on rank 0 alone | pipeline: each part stays on its rank,
    # the glued flow trained end to end through torch.distributed.pipelining (gradients sent back)
    finetune: str = "ddp"
    microbatches: int = 4  # pipelined fine-tuning cuts each batch into this many
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe: the order of pipelined fine-tuning's passes


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N steps (0: only at each epoch end)
    keep: int = 2  # checkpoints kept per rank


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# How a model may be cut (see pipeflow.parts); the tools compare the ones that need no cut points.
SCHEMES = ("blocks", "across", "cuts", "balanced")
AUTOMATIC_SCHEMES = ("blocks", "across", "balanced")
# The densities a part may put on its output (see pipeflow.priors).
BOUNDARY_PRIORS = ("standard", "learned", "position", "conditional", "flow")

CHOICES = {
    ("model", "coupling"): ("affine", "additive"),
    ("data", "dataset"): ("digits", "npz", "mnist", "fashion_mnist", "cifar10"),
    ("parts", "scheme"): SCHEMES,
    ("parts", "boundary_prior"): BOUNDARY_PRIORS,
    ("train", "schedule"): ("e2e", "pipeline", "alternate", "sequential"),
    ("train", "optimizer"): ("adam", "adamax"),
    ("train", "lr_schedule"): ("constant", "cosine"),
    ("train", "finetune_optimizer"): ("carry", "fresh"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("distributed", "backend"): ("auto", "gloo", "nccl"),
    ("distributed", "finetune"): ("ddp", "rank0", "pipeline"),
    ("distributed", "pipeline_schedule"): ("1f1b", "gpipe"),
}

# (section, key): (lowest allowed, a word on why)
MINIMUM = {
    ("model", "levels"): 1, ("model", "steps"): 1, ("model", "hidden"): 1,
    ("data", "n_bits"): 0, ("data", "train_limit"): 0, ("data", "test_limit"): 0,
    ("parts", "count"): 0,
    ("train", "by_parts_epochs"): 0, ("train", "finetune_epochs"): 0, ("train", "batch_size"): 1,
    ("train", "eval_batch_size"): 1, ("train", "warmup_steps"): 0, ("train", "grad_clip"): 0,
    ("train", "alternate_every"): 0, ("train", "steps_per_epoch"): 0, ("train", "threads"): 0,
    ("train", "log_every"): 1, ("train", "samples"): 0, ("train", "max_bad_steps"): 1,
    ("train", "finetune_lr"): 0, ("train", "find_lr_steps"): 0,
    ("distributed", "in_flight"): 1, ("distributed", "microbatches"): 1,
    ("checkpoint", "every_steps"): 0, ("checkpoint", "keep"): 1,
}


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r}")


def _section_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


ONE_DEVICE_PARTS = 2  # parts.count left out on one device: the paper's split in two


def parts_count(cfg: Config, processes: int | None = None) -> int:
    """The number of parts P: ``parts.count`` where given, else one part per process.

    A multi-process run of ``processes`` ranks makes replicas of its pipeline only when asked to
    (an explicit count that divides them). On one device (``processes`` None), and for the
    ``e2e`` schedule, which trains no parts, a count left out is 2.
    """
    if cfg.parts.count:
        return cfg.parts.count
    if processes is None or cfg.train.schedule == "e2e":
        return ONE_DEVICE_PARTS
    return processes


def from_dict(raw: dict[str, Any], processes: int | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts (as TOML gives them).

    ``parts.count`` comes out resolved (see :func:`parts_count`): what the run uses and writes
    into its ``config.toml``, so a resumed run compares equal to it.
    """
    sections = _section_types(Config)
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise UserError(f"unknown config section [{name}]; known: {', '.join(sections)}")
        if not isinstance(value, dict):
            raise UserError(f"[{name}] must be a table of keys")
        types = _section_types(sections[name])
        for key in value:
            if key not in types:
                raise UserError(f"unknown config key {name}.{key}; known in [{name}]: {', '.join(types)}")
        built[name] = sections[name](**{k: _check_type(f"{name}.{k}", v, types[k]) for k, v in value.items()})
    cfg = Config(**built)
    cfg.parts.count = parts_count(cfg, processes)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and consistency checks; each failure is one line naming the key."""
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise UserError(f"{section}.{key} = {value!r} is not one of {', '.join(choices)}")
    for (section, key), low in MINIMUM.items():
        value = getattr(getattr(cfg, section), key)
        if value < low:
            raise UserError(f"{section}.{key} = {value} must be at least {low}")
    t, p, m = cfg.train, cfg.parts, cfg.model
    if not t.lr > 0:
        raise UserError(f"train.lr = {t.lr} must be positive")
    if any(not lr > 0 for lr in t.part_lrs):
        raise UserError(f"train.part_lrs = {t.part_lrs} must all be positive")
    if t.part_lrs and len(t.part_lrs) != p.count:
        raise UserError(f"train.part_lrs has {len(t.part_lrs)} entries for parts.count = {p.count}")
    if t.find_lr_steps and (t.part_lrs or t.schedule == "e2e"):
        raise UserError("train.find_lr_steps finds the rates of the parts: it goes without train.part_lrs and "
                        "without schedule 'e2e'")
    if not 0 <= t.feed_ema < 1:
        raise UserError(f"train.feed_ema = {t.feed_ema} must be in [0, 1) (0: off)")
    if t.feed_ema and t.schedule not in ("pipeline", "alternate"):
        raise UserError(f"train.feed_ema applies to the pipeline and alternate schedules, not {t.schedule!r}")
    if not cfg.distributed.timeout_s > 0:
        raise UserError(f"distributed.timeout_s = {cfg.distributed.timeout_s} must be positive")
    if not 0.0 <= t.eval_ema < 1.0:
        raise UserError(f"train.eval_ema = {t.eval_ema} must be at least 0 and below 1 (0: off)")
    if p.count > m.levels * m.steps:
        raise UserError(f"parts.count = {p.count} is more than the {m.levels * m.steps} flow steps of the model")
    if t.schedule == "sequential" and t.by_parts_epochs and t.by_parts_epochs < p.count:
        raise UserError(f"schedule 'sequential' needs train.by_parts_epochs >= parts.count = {p.count}")
    d = cfg.distributed
    if d.finetune == "pipeline" and t.batch_size % d.microbatches:
        raise UserError(f"train.batch_size = {t.batch_size} must be a multiple of distributed.microbatches = "
                        f"{d.microbatches} for pipelined fine-tuning")
    if cfg.data.dataset == "npz" and not cfg.data.path:
        raise UserError("data.dataset = 'npz' needs data.path, the .npz file to read")
    if cfg.data.levels and not 2 <= cfg.data.levels <= 256:
        raise UserError(f"data.levels = {cfg.data.levels} must be 0 (the data's own) or in 2..256")
    if cfg.data.n_bits > 8:
        raise UserError(f"data.n_bits = {cfg.data.n_bits} must be at most 8")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with ``value`` read as a TOML value (bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _apply(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"[{section}] must be a table of keys")
        raw[section][key] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                processes: int | None = None) -> Config:
    """The config in ``path`` (None: every default) with ``overrides`` applied, validated.

    ``processes``: the ranks of a multi-process run, one part each where ``parts.count`` is left out.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    return from_dict(_apply(raw, overrides), processes)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied and validated."""
    return from_dict(_apply(cfg.to_dict(), overrides))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written into every run directory)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def holds_config(path: Path, cfg: Config) -> bool:
    """Whether the config file ``path`` (a run's ``config.toml``) is ``cfg`` as data: a key added to pipeflow
    since it was written counts as its default, so an older run still matches."""
    try:
        return path.is_file() and load_config(path).to_dict() == cfg.to_dict()
    except UserError:
        return False
