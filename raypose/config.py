"""One config tree for a training run, with every default in one place.

Built from defaults, then a YAML file, then `--set key=value` overrides; saved as JSON inside every
checkpoint.  Keys are dotted paths (`model.lrn_alpha`) or, where unambiguous, bare leaf names
(`lrn_alpha`); `lambda` is an alias of `loss.detection_weight`.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raypose.model import ModelConfig


class ConfigError(ValueError):
    """A bad setting; the message names the file or flag and the key."""


@dataclass
class DataConfig:
    path: str = "data/synth"  # directory holding train.h5 and test.h5, or s3://... (raypose.datacache)
    val_subjects: list = field(default_factory=lambda: ["S8"])  # held out of train.h5 for validation
    batch_size: int = 64  # per worker
    augment: bool = True  # random 112 crop, PCA colour noise, left/right flip
    color_noise: float = 0.1  # std of the AlexNet PCA colour noise
    flip: bool = True
    max_train_samples: int = 0  # 0 = all; a cap for smoke runs
    max_val_samples: int = 0


@dataclass
class LossConfig:
    # lambda in E_r + lambda * E_d; 1 reproduces the paper, but E_d sums 1700 BCE terms (~270 per
    # sample) against 51 squared offsets (~0.3), so the trunk would see almost only detection
    detection_weight: float = 1.0e-4


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 3e-4
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    kind: str = "joint"  # joint | pretrain
    epochs: int = 10
    pretrain_share: float = 0.5  # pretrain only: share of epochs spent on the detection stage


@dataclass
class ScalingConfig:
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: int = 1
    channels_last: bool = True
    amp: bool = True  # mixed precision where the device supports it (bf16 on GPUs that have it)
    compile: bool = False  # torch.compile the training model (raypose bench train measures both)


@dataclass
class StorageConfig:
    uri: str = "runs"  # a path, file://..., or s3://bucket/prefix
    name: str = "raypose"  # the run's name under uri; the same name resumes
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2
    # a checkpoint every this many epochs, and always at the last epoch and at the best val_mpjpe
    # so far; uploaded in the background while training goes on
    checkpoint_every: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> "Config":
        """Range checks that need no file system and no cluster."""
        checks = [
            (self.scaling.workers >= 1, "scaling.workers", "must be >= 1"),
            (self.scaling.cpus_per_worker >= 1, "scaling.cpus_per_worker", "must be >= 1"),
            (self.schedule.epochs >= 1, "schedule.epochs", "must be >= 1"),
            (self.schedule.kind in ("joint", "pretrain"), "schedule.kind", "must be joint or pretrain"),
            (0.0 < self.schedule.pretrain_share < 1.0, "schedule.pretrain_share", "must be in (0, 1)"),
            (self.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
            (self.optim.name in ("adam", "sgd"), "optim.name", "must be adam or sgd"),
            (self.optim.lr > 0, "optim.lr", "must be > 0"),
            (self.loss.detection_weight >= 0, "loss.detection_weight", "must be >= 0"),
            (self.model.lrn_alpha >= 0, "model.lrn_alpha", "must be >= 0"),
            (self.model.lrn_beta >= 0, "model.lrn_beta", "must be >= 0"),
            (self.model.lrn_window >= 1 and self.model.lrn_window % 2 == 1, "model.lrn_window",
             "must be an odd positive integer"),
            (0.0 <= self.model.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
            (self.storage.max_failures >= 0, "storage.max_failures", "must be >= 0"),
            (self.storage.keep_checkpoints >= 1, "storage.keep_checkpoints", "must be >= 1"),
            (self.storage.checkpoint_every >= 1, "storage.checkpoint_every", "must be >= 1"),
        ]
        if self.schedule.kind == "pretrain":
            checks.append((self.schedule.epochs >= 2, "schedule.epochs",
                           "must be >= 2 for the pretrain schedule (one epoch per stage at least)"))
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"{key} {what}; got {get_value(self, key)!r}")
        return self

    def pretrain_epochs(self) -> int:
        """Epochs of the detection stage (pretrain schedule); 0 for joint training."""
        if self.schedule.kind != "pretrain":
            return 0
        n = round(self.schedule.epochs * self.schedule.pretrain_share)
        return min(max(n, 1), self.schedule.epochs - 1)


ALIASES = {"lambda": "loss.detection_weight", "epochs": "schedule.epochs",
           "schedule": "schedule.kind", "workers": "scaling.workers"}


def _leaf_paths(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(value, path + ".")
        else:
            yield path


def get_value(obj, path: str):
    """The value at a dotted config path."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_key(obj, key: str, source: str) -> str:
    """A dotted path, a unique leaf name or an alias -> the dotted path."""
    paths = list(_leaf_paths(obj))
    if key in paths:
        return key
    if key in ALIASES and ALIASES[key] in paths:
        return ALIASES[key]
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{source}: key {key!r} is ambiguous; use one of {matches}")
    raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(paths)}")


def _coerce(value, default, path: str, source: str):
    def bad():
        return ConfigError(f"{source}: {path} expects {type(default).__name__}, "
                           f"got {value!r} ({type(value).__name__})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad()
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise bad()
        return list(value)
    raise bad()


def set_value(obj, key: str, value, source: str):
    """Set one (possibly dotted) key with type checking; returns obj."""
    path = resolve_key(obj, key, source)
    parent_path, _, leaf = path.rpartition(".")
    parent = get_value(obj, parent_path) if parent_path else obj
    setattr(parent, leaf, _coerce(value, getattr(parent, leaf), path, source))
    return obj


def apply_overrides(obj, overrides, source: str = "--set"):
    """Apply `key=value` strings; values are parsed as YAML scalars (1e-3, true, joint)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, float) is False and isinstance(value, str) and _looks_like_float(raw):
            value = float(raw)
        set_value(obj, key.strip(), value, f"{source} {key.strip()}")
    return obj


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads "1e-3" as a string; treat it as the number the user meant
    try:
        float(raw)
        return True
    except ValueError:
        return False


def apply_mapping(obj, mapping: dict, source: str, prefix: str = ""):
    """Apply a nested dict (a YAML file's content) with the same checks as --set."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping at {prefix or 'the top level'}, "
                          f"got {type(mapping).__name__}")
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        try:
            sub = get_value(obj, path)
        except AttributeError:
            sub = None
        if dataclasses.is_dataclass(sub):
            apply_mapping(obj, value, source, path + ".")
        else:
            set_value(obj, path, value, f"{source}: key {path}")
    return obj


def load_config(path=None, overrides=(), base: Config | None = None) -> Config:
    """Defaults <- YAML file <- --set overrides, validated."""
    cfg = base if base is not None else Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            mapping = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        apply_mapping(cfg, mapping, str(path))
    apply_overrides(cfg, overrides)
    return cfg.validate()


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its to_dict() form (a checkpoint's config.json)."""
    cfg = Config()
    apply_mapping(cfg, d, "checkpoint config")
    return cfg
