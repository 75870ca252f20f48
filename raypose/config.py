"""One config tree for a training run, with every default in one place.

Built from defaults, then a YAML file, then `--set key=value` overrides; saved as JSON inside every
checkpoint.  Keys are dotted paths (`model.lrn_alpha`) or, where unambiguous, bare leaf names
(`lrn_alpha`); `lambda` is an alias of `loss.detection_weight`.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import yaml

from raypose.validate import YAMLLimitError, clipped, load_yaml_text, shown


class ConfigError(ValueError):
    """A bad setting; the message names the file or flag and the key (`key`, when known)."""

    def __init__(self, message, key: str | None = None):
        super().__init__(message)
        self.key = key


# Upper bounds that catch typos (a width of 1e6 is 6.5e9 weights in fcr1 alone), not taste.
MAX_WIDTH = 65536
MAX_LRN_WINDOW = 95  # a window wider than twice the 48 x 48 LRN map adds nothing

# The network's fixed shapes (raypose.model.network, which needs torch; this module does not), for the
# memory estimate below. tests/local_ray/test_guards.py holds them against the model itself.
TRUNK_PARAMETERS = (3 * 9 * 9 + 1) * 32 + (32 * 5 * 5 + 1) * 64 + (64 * 5 * 5 + 1) * 64
TRUNK_FEATURES = 64 * 10 * 10
HEAD_OUTPUTS = {"regression": 17 * 3, "detection": 17 * 100}
# floats per sample that a training forward pass keeps for its backward pass (float32; bf16
# autocast keeps less): the input, relu(conv1), pool1 with its int64 indices (two floats' worth
# each), relu(conv2) with the spatial LRN's four intermediates, pool2 with indices, conv3, pool3
# with indices. Each head adds 3 * fc1_width (relu, dropout mask, dropout) + fc2_width + outputs.
TRUNK_SAVED_FLOATS = (
    3 * 112 * 112
    + 32 * 104 * 104
    + 3 * 32 * 52 * 52
    + 5 * 64 * 48 * 48
    + 3 * 64 * 24 * 24
    + 64 * 20 * 20
    + 3 * 64 * 10 * 10
)
# peak activation memory of a step over what the forward pass keeps: the backward pass's
# gradients of the activations and the forward's short-lived outputs come on top (a float32 step
# on the CPU peaks at about 1.5 to 1.7 times the kept floats; 2 leaves room)
ACTIVATION_PEAK_FACTOR = 2.0
# The share of the machine's physical memory that one training worker's estimate may take: Ray
# reserves 30 % for its object store by default and its memory monitor kills workers at 95 %;
# the rest holds Ray's own processes, the driver, the data reader and the operating system.
MEMORY_SHARE = 0.5


def parse_workers(text, flag: str) -> tuple:
    """`N` or `MIN:MAX` (elastic) from a command line flag as (min_workers, workers); min_workers
    is 0 for a fixed N, the config's way of saying "not elastic"."""
    text = str(text).strip()
    low, sep, high = text.partition(":")
    try:
        numbers = (int(low), int(high)) if sep else (int(text), int(text))
    except ValueError:
        raise ConfigError(
            f"{flag} must be N or MIN:MAX (whole numbers), got {shown(text)}"
        ) from None
    if numbers[0] < 1 or numbers[0] > numbers[1]:
        raise ConfigError(
            f"{flag} must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {shown(text)}"
        )
    return (numbers[0] if sep else 0, numbers[1])


# The shares of one GPU a worker may ask for: a whole GPU, or 1/k of one for k workers on it.
# Powers of two keep k x share exactly 1 in Ray's resource arithmetic (units of 0.0001).
GPU_SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625)
GPU_SHARE_RULE = "must be 1 or a share 1/k of one GPU: 0.5, 0.25, 0.125 or 0.0625"
# CPUs per worker under a GPU share when scaling.cpus_per_worker is not set: the step loop's
# thread and the host feed's reader, so that k trials packed on one GPU keep k feeds going
# (docs/training.md#fractional-gpus)
CPUS_PER_SHARED_GPU_WORKER = 2
MAX_READER_THREADS = 4


def parse_gpus_per_worker(text, flag: str) -> float:
    """`--gpus-per-worker G`: 0 (CPU workers), 1, or a share 1/k of one GPU written as a number
    (0.25) or a fraction (1/4)."""
    raw = str(text).strip()
    try:
        if "/" in raw:
            top, bottom = raw.split("/", 1)
            value = int(top) / int(bottom)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or (value != 0.0 and value not in GPU_SHARES):
        raise ConfigError(
            f"{flag} must be 0 (CPU workers), 1 or a share 1/k of one GPU "
            f"(0.5, 0.25, 0.125, 0.0625 or 1/2, 1/4, 1/8, 1/16), got {shown(raw)}"
        )
    return value


def gpus_per_worker_arg(text) -> float:
    """parse_gpus_per_worker as an argparse type: a bad value is argparse's one-line error
    naming --gpus-per-worker (exit 2)."""
    import argparse

    try:
        return parse_gpus_per_worker(text, "--gpus-per-worker")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--gpus-per-worker ")) from None


def set_gpus_per_worker(cfg, text, flag: str, sources: dict) -> None:
    """`--gpus-per-worker` into scaling.gpu and scaling.gpu_share; under a share below 1,
    scaling.cpus_per_worker becomes CPUS_PER_SHARED_GPU_WORKER unless a file or --set gave it."""
    value = parse_gpus_per_worker(text, flag)
    set_value(cfg, "scaling.gpu", value > 0, flag)
    set_value(cfg, "scaling.gpu_share", value if value > 0 else 1.0, flag)
    sources["scaling.gpu"] = sources["scaling.gpu_share"] = flag
    if 0 < value < 1 and "scaling.cpus_per_worker" not in sources:
        set_value(cfg, "scaling.cpus_per_worker", CPUS_PER_SHARED_GPU_WORKER, flag)
        sources["scaling.cpus_per_worker"] = flag


def set_workers(cfg, text, flag: str, sources: dict) -> None:
    """`--workers` / `--workers-per-trial` (N or MIN:MAX) into scaling.workers and
    scaling.min_workers; both keys are recorded in sources as coming from flag."""
    min_workers, workers = parse_workers(text, flag)
    set_value(cfg, "scaling.workers", workers, flag)
    set_value(cfg, "scaling.min_workers", min_workers, flag)
    sources["scaling.workers"] = sources["scaling.min_workers"] = flag


@dataclass
class ModelConfig:
    """The network's settings (raypose.model.network); here so that config stays free of torch."""

    lrn_alpha: float = 0.0025  # paper value
    lrn_beta: float = 0.75  # paper value
    lrn_window: int = 5  # square spatial neighbourhood of the LRN
    dropout: float = (
        0.25  # probability of dropping a unit after fcr1/fcd1 (author's code keeps 25 %: 0.75)
    )
    fc1_width: int = 1024
    fc2_width: int = 2048


@dataclass
class DataConfig:
    path: str = (
        "data/synth"  # directory holding train.h5 and test.h5, or s3://... (raypose.data.cache)
    )
    # subjects of train.h5 held out for validation; [] trains on every subject (the paper's
    # protocol: a fixed epoch budget, the last checkpoint is the one evaluated)
    val_subjects: list = field(default_factory=lambda: ["S8"])
    # > 0: every Nth sequence (one subject's one action) of the training subjects is held out for
    # validation as well, so a run on every subject still has a score to search on
    val_sequence_every: int = 0
    # the actions trained on (and evaluated); [] = all of them. A per-action sweep sets one
    actions: list = field(default_factory=list)
    batch_size: int = 64  # per worker
    augment: bool = True  # random 112 crop, PCA colour noise, left/right flip
    color_noise: float = 0.1  # std of the AlexNet PCA colour noise
    flip: bool = True
    max_train_samples: int = 0  # 0 = all; a cap for smoke runs
    max_val_samples: int = 0
    # training samples per epoch (0 = the whole training split): epochs take consecutive slices
    # of one shuffled pass, so a run of a few short epochs sees new samples in each
    # (raypose.data.dataset.epoch_positions)
    epoch_samples: int = 0
    # where training batches come from. resident: the training split held on the training
    # device as uint8 crops (about 49 KB a sample), with crops, flips and colour noise drawn
    # there (raypose.data.resident; the same batches as the host feed for the same seed);
    # host: read from the file by host threads; auto: resident on CUDA when it fits the
    # worker's share of the GPU (raypose.train.packing.resident_decision), else host
    feed: str = "auto"
    # threads reading the host feed: 0 = auto, two on CUDA, where one reader is the limit of a
    # fast loop, one on CPU, where the step is
    reader_threads: int = 0


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
    # constant: lr throughout; cosine: the rate falls from lr to 0 along a half cosine over each
    # stage's epochs (the joint schedule's, or each stage of the pretrain schedule), set before
    # every step. raypose/train/loop.py: lr_factor; measured in docs/benchmarks/.
    lr_schedule: str = "constant"


@dataclass
class ScheduleConfig:
    kind: str = "joint"  # joint | pretrain
    epochs: int = 10
    pretrain_share: float = 0.5  # pretrain only: share of epochs spent on the detection stage


@dataclass
class ScalingConfig:
    workers: int = 1  # Ray Train workers; with min_workers, the most the group grows to
    # elastic training (Ray Train V2 num_workers=(min, max)): the group runs with as few as this
    # many workers when nodes are lost and grows back to `workers` when they return; 0 = fixed
    min_workers: int = 0
    placement: str = "PACK"  # PACK (fewest nodes) | SPREAD (one worker per node where possible)
    # elastic only: how often Ray Train checks whether a smaller group can grow again
    resize_interval_s: float = 60.0
    # how long to wait for the autoscaler to add nodes the run needs before giving up
    autoscaler_wait_s: float = 900.0
    gpu: bool = False
    # with gpu: the share of one GPU each worker asks Ray for: 1, or 1/k (GPU_SHARES) so that k
    # single-worker runs (the trials of a sweep) share one GPU
    gpu_share: float = 1.0
    cpus_per_worker: int = 1
    channels_last: bool = True
    amp: bool = True  # bf16 autocast where it is native: GPUs with bf16, CPUs with avx512_bf16/AMX
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

    def validate(self, sources: dict | None = None) -> "Config":
        """Type-independent range checks that need no file system and no cluster, then the
        memory the model and the batch would take on this machine (check_memory).

        sources: {dotted key: where it was set ("--epochs", "--set lr", "config file F")}; the
        error names that source, so the user reads the flag or file they typed."""
        from raypose.validate import NAME_PATTERN, NAME_RULE

        checks = []
        # NaN and inf pass every comparison below the wrong way (or crash training later)
        for path in _leaf_paths(self):
            value = get_value(self, path)
            if isinstance(value, float):
                checks.append((math.isfinite(value), path, "must be a finite number"))
        name = self.storage.name
        checks += [
            (self.scaling.workers >= 1, "scaling.workers", "must be >= 1"),
            (self.scaling.cpus_per_worker >= 1, "scaling.cpus_per_worker", "must be >= 1"),
            (self.scaling.gpu_share in GPU_SHARES, "scaling.gpu_share", GPU_SHARE_RULE),
            (
                self.scaling.gpu_share == 1.0 or self.worker_range() == (1, 1),
                "scaling.workers",
                "must be 1 with a GPU share below 1 (scaling.gpu_share): the ranks of one "
                "data-parallel group cannot share a GPU (NCCL refuses two ranks on one device)",
            ),
            (
                self.data.feed in ("auto", "resident", "host"),
                "data.feed",
                "must be auto, resident or host",
            ),
            (
                0 <= self.data.reader_threads <= MAX_READER_THREADS,
                "data.reader_threads",
                f"must be 0 (auto) or 1 to {MAX_READER_THREADS}",
            ),
            (
                0 <= self.scaling.min_workers <= self.scaling.workers,
                "scaling.min_workers",
                f"must be 0 (fixed) or between 1 and scaling.workers ({self.scaling.workers})",
            ),
            (
                self.scaling.placement in ("PACK", "SPREAD"),
                "scaling.placement",
                "must be PACK or SPREAD",
            ),
            (self.scaling.resize_interval_s > 0, "scaling.resize_interval_s", "must be > 0"),
            (self.scaling.autoscaler_wait_s >= 0, "scaling.autoscaler_wait_s", "must be >= 0"),
            (self.schedule.epochs >= 1, "schedule.epochs", "must be >= 1"),
            (
                self.schedule.kind in ("joint", "pretrain"),
                "schedule.kind",
                "must be joint or pretrain",
            ),
            (
                0.0 < self.schedule.pretrain_share < 1.0,
                "schedule.pretrain_share",
                "must be in (0, 1)",
            ),
            (self.data.path != "", "data.path", "must name a folder"),
            (self.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
            (self.data.color_noise >= 0, "data.color_noise", "must be >= 0"),
            (self.data.max_train_samples >= 0, "data.max_train_samples", "must be >= 0 (0 = all)"),
            (self.data.max_val_samples >= 0, "data.max_val_samples", "must be >= 0 (0 = all)"),
            (self.data.epoch_samples >= 0, "data.epoch_samples", "must be >= 0 (0 = all)"),
            (
                all(isinstance(s, str) and s.strip() for s in self.data.val_subjects),
                "data.val_subjects",
                "must list subject names, e.g. [S8], or be [] to train on every subject",
            ),
            (
                self.data.val_sequence_every >= 0,
                "data.val_sequence_every",
                "must be >= 0 (0 = no sequence held out)",
            ),
            (
                all(isinstance(a, str) and a.strip() for a in self.data.actions),
                "data.actions",
                "must list action names, or be [] for all actions",
            ),
            (self.optim.name in ("adam", "sgd"), "optim.name", "must be adam or sgd"),
            (self.optim.lr > 0, "optim.lr", "must be > 0"),
            (
                self.optim.lr_schedule in ("cosine", "constant"),
                "optim.lr_schedule",
                "must be cosine or constant",
            ),
            (0.0 <= self.optim.momentum < 1.0, "optim.momentum", "must be in [0, 1)"),
            (self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
            (self.loss.detection_weight >= 0, "loss.detection_weight", "must be >= 0"),
            (self.model.lrn_alpha >= 0, "model.lrn_alpha", "must be >= 0"),
            (self.model.lrn_beta >= 0, "model.lrn_beta", "must be >= 0"),
            (
                1 <= self.model.lrn_window <= MAX_LRN_WINDOW and self.model.lrn_window % 2 == 1,
                "model.lrn_window",
                f"must be an odd integer in [1, {MAX_LRN_WINDOW}]",
            ),
            (0.0 <= self.model.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
            (
                1 <= self.model.fc1_width <= MAX_WIDTH,
                "model.fc1_width",
                f"must be in [1, {MAX_WIDTH}]",
            ),
            (
                1 <= self.model.fc2_width <= MAX_WIDTH,
                "model.fc2_width",
                f"must be in [1, {MAX_WIDTH}]",
            ),
            (
                self.storage.uri != "",
                "storage.uri",
                "must be a path, file://... or s3://bucket/prefix",
            ),
            (
                bool(NAME_PATTERN.fullmatch(name)) and ".." not in name,
                "storage.name",
                f"must be {NAME_RULE}",
            ),
            (self.storage.max_failures >= 0, "storage.max_failures", "must be >= 0"),
            (self.storage.keep_checkpoints >= 1, "storage.keep_checkpoints", "must be >= 1"),
            (self.storage.checkpoint_every >= 1, "storage.checkpoint_every", "must be >= 1"),
            # numpy's and torch's generators take seeds in [0, 2**32)
            (0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)"),
        ]
        if self.schedule.kind == "pretrain":
            checks.append(
                (
                    self.schedule.epochs >= 2,
                    "schedule.epochs",
                    "must be >= 2 for the pretrain schedule (one epoch per stage at least)",
                )
            )
        for ok, key, what in checks:
            if not ok:
                raise self._error(key, what, sources)
        return self.check_memory(sources)

    def _error(self, key: str, what: str, sources: dict | None) -> ConfigError:
        source = (sources or {}).get(key)
        prefix = f"{source}: " if source else ""
        return ConfigError(f"{prefix}{key} {what}; got {shown(get_value(self, key))}", key=key)

    def check_memory(self, sources: dict | None = None, memory: int | None = None) -> "Config":
        """Refuses widths and batch sizes whose training_memory estimate exceeds MEMORY_SHARE of
        this machine's physical memory (memory: that many bytes instead), naming the setting that
        weighs most: data.batch_size when the activations outweigh the weights and their state,
        else the width whose return to its default saves the most parameters."""
        memory = machine_memory_bytes() if memory is None else memory
        if not memory:
            return self  # a platform that does not say: nothing to compare with
        need = training_memory(self)
        allowed = MEMORY_SHARE * memory
        if need["total_bytes"] <= allowed:
            return self
        if need["activation_bytes"] > need["state_bytes"]:
            key = "data.batch_size"
        else:
            defaults = ModelConfig()
            heads = training_heads(self)

            def saved(width_key):
                model = dataclasses.replace(self.model, **{width_key: getattr(defaults, width_key)})
                return need["parameters"] - parameter_count(model, heads)

            key = "model." + max(("fc1_width", "fc2_width"), key=saved)
        gb = 1e9
        raise self._error(
            key,
            (
                f"is too large for this machine's memory: one training worker would need about "
                f"{need['total_bytes'] / gb:.1f} GB ({need['parameters']:,} parameters with their "
                f"gradients and optimizer state: {need['state_bytes'] / gb:.1f} GB; the activations "
                f"of a batch of {self.data.batch_size}: {need['activation_bytes'] / gb:.1f} GB), more "
                f"than the {allowed / gb:.1f} GB allowed ({MEMORY_SHARE:.0%} of the machine's "
                f"{memory / gb:.1f} GB); lower model.fc1_width, model.fc2_width or "
                "data.batch_size"
            ),
            sources,
        )

    def worker_range(self) -> tuple:
        """(min, max) Ray Train workers; min == max for a fixed-size group."""
        return (self.scaling.min_workers or self.scaling.workers, self.scaling.workers)

    def pretrain_epochs(self) -> int:
        """Epochs of the detection stage (pretrain schedule); 0 for joint training."""
        if self.schedule.kind != "pretrain":
            return 0
        n = round(self.schedule.epochs * self.schedule.pretrain_share)
        return min(max(n, 1), self.schedule.epochs - 1)


def machine_memory_bytes() -> int | None:
    """This machine's physical memory in bytes; None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def training_heads(cfg: Config) -> tuple:
    """The heads of the largest model a run trains: both for joint training; the detection head
    (the larger output) for the pretrain schedule, whose stages train one head each."""
    return ("regression", "detection") if cfg.schedule.kind == "joint" else ("detection",)


def parameter_count(model: ModelConfig, heads=("regression", "detection")) -> int:
    """The parameters of raypose.model.network.LiChanNet with these heads, from the widths alone."""
    f1, f2 = model.fc1_width, model.fc2_width
    total = TRUNK_PARAMETERS
    for head in heads:
        total += (TRUNK_FEATURES + 1) * f1 + (f1 + 1) * f2 + (f2 + 1) * HEAD_OUTPUTS[head]
    return total


def saved_activation_floats(model: ModelConfig, heads=("regression", "detection")) -> int:
    """Floats per sample that a training forward pass keeps for its backward pass."""
    return TRUNK_SAVED_FLOATS + sum(
        3 * model.fc1_width + model.fc2_width + HEAD_OUTPUTS[head] for head in heads
    )


def training_memory(cfg: Config) -> dict:
    """An estimate of one training worker's peak memory in bytes (float32 throughout): the
    weights with their gradients, the optimizer's buffers (Adam's two moments, SGD's momentum)
    and DDP's gradient buckets with more than one worker (state_bytes), and the activations of
    one batch of data.batch_size (activation_bytes). Keys: parameters, state_bytes,
    activation_bytes, total_bytes."""
    heads = training_heads(cfg)
    parameters = parameter_count(cfg.model, heads)
    if cfg.optim.name == "adam":
        buffers = 2
    else:
        buffers = 1 if cfg.optim.momentum > 0 else 0
    copies = 2 + buffers + (1 if cfg.scaling.workers > 1 else 0)
    state = 4 * parameters * copies
    activations = int(
        4 * ACTIVATION_PEAK_FACTOR * cfg.data.batch_size * saved_activation_floats(cfg.model, heads)
    )
    return {
        "parameters": parameters,
        "state_bytes": state,
        "activation_bytes": activations,
        "total_bytes": state + activations,
    }


ALIASES = {
    "lambda": "loss.detection_weight",
    "epochs": "schedule.epochs",
    "schedule": "schedule.kind",
    "workers": "scaling.workers",
}


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
        raise ConfigError(f"{source}: key {shown(key)} is ambiguous; use one of {matches}")
    raise ConfigError(f"{source}: unknown key {shown(key)}; known keys: {', '.join(paths)}")


def _coerce(value, default, path: str, source: str):
    def bad():
        return ConfigError(
            f"{source}: {path} expects {type(default).__name__}, "
            f"got {shown(value)} ({type(value).__name__})"
        )

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


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping (Config.to_dict()) as {dotted key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_value(obj, key: str, value, source: str):
    """Set one (possibly dotted) key with type checking; returns obj."""
    path = resolve_key(obj, key, source)
    parent_path, _, leaf = path.rpartition(".")
    parent = get_value(obj, parent_path) if parent_path else obj
    setattr(parent, leaf, _coerce(value, getattr(parent, leaf), path, source))
    return obj


def apply_overrides(obj, overrides, source: str = "--set", sources: dict | None = None):
    """Apply `key=value` strings; values are parsed as YAML scalars (1e-3, true, joint).
    sources, when given, records {dotted key: "--set KEY"} for Config.validate's messages."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {shown(item)}")
        key, raw = item.split("=", 1)
        where = f"{source} {clipped(key.strip())}"
        try:
            value = load_yaml_text(raw) if raw.strip() else ""
        except YAMLLimitError as e:
            raise ConfigError(f"{where}: refused: {e}") from None
        except (yaml.YAMLError, ValueError):  # not YAML, or e.g. 2024-13-45: the text as typed
            value = raw
        if isinstance(value, float) is False and isinstance(value, str) and _looks_like_float(raw):
            value = float(raw)
        set_value(obj, key.strip(), value, where)
        if sources is not None:
            sources[resolve_key(obj, key.strip(), source)] = f"{source} {clipped(item)}"
    return obj


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads "1e-3" as a string; treat it as the number the user meant
    try:
        float(raw)
        return True
    except ValueError:
        return False


def apply_mapping(obj, mapping: dict, source: str, prefix: str = "", sources: dict | None = None):
    """Apply a nested dict (a YAML file's content) with the same checks as --set.
    sources, when given, records {dotted key: source} for Config.validate's messages."""
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"{source}: expected a mapping at {prefix or 'the top level'}, "
            f"got {type(mapping).__name__}"
        )
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        try:
            sub = get_value(obj, path)
        except AttributeError:
            sub = None
        if dataclasses.is_dataclass(sub):
            apply_mapping(obj, value, source, path + ".", sources)
        else:
            set_value(obj, path, value, f"{source}: key {clipped(path)}")
            if sources is not None:
                sources[resolve_key(obj, path, source)] = f"{source}: key {path}"
    return obj


def load_config(
    path=None, overrides=(), base: Config | None = None, sources: dict | None = None
) -> Config:
    """Defaults <- YAML file <- --set overrides, validated.  sources (filled in when given) maps
    each key set here to where it was set, for the caller's own later validate()."""
    from raypose.validate import read_yaml

    cfg = base if base is not None else Config()
    sources = {} if sources is None else sources
    if path:
        mapping = read_yaml(path, "config file", ConfigError) or {}
        apply_mapping(cfg, mapping, f"config file {path}", sources=sources)
    apply_overrides(cfg, overrides, sources=sources)
    return cfg.validate(sources)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its to_dict() form (a checkpoint's config.json), refusing one whose
    model and batch would not fit this machine's memory (Config.check_memory) before anything
    builds the model. Not the whole validate(): a sweep trial's storage.name holds slashes
    (<experiment>/train/<trial>), which a name given by the user may not."""
    cfg, sources = Config(), {}
    apply_mapping(cfg, d, "checkpoint config", sources=sources)
    return cfg.check_memory(sources)


def config_from_checkpoint(d, source: str) -> Config:
    """A checkpoint's config.json (d, its parsed content) as a Config, with every check of
    Config.validate (types, ranges, then check_memory) and the message naming source (the
    checkpoint's file) and the key; for a caller that builds the model from it. A sweep trial's
    storage.name holds slashes (<experiment>/train/<trial>), which a name given by the user may
    not: it is kept as it is and not checked."""
    cfg, sources = Config(), {}
    apply_mapping(cfg, d, source, sources=sources)
    named = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, name="checkpoint"))
    named.validate(sources)
    return cfg
