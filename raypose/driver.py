"""The driver-side steps that `raypose train`, `raypose tune` and `raypose evaluate` share: checks
that need no cluster (preflight), connecting to Ray, and the checks made once connected.

Where Ray plugs in is marked `# Ray:`.  Nothing here runs on a worker.
"""

import functools
import json
import os
import posixpath

from raypose import checkpoint, storage
from raypose.config import Config, ConfigError
from raypose.metrics import mean_pose_baseline


# ----------------------------------------------------------------------------------------------
# Before Ray starts: config, data, storage, resume


def preflight(cfg: Config) -> storage.Location:
    """Every check that needs no cluster: config ranges, data files and splits, storage.
    Raises one clear error before Ray starts anything. Makes the data path and a local
    storage path absolute."""
    cfg.validate()
    # workers (and Tune trials, which run in their own folders) see the driver's data by an
    # absolute path
    cfg.data.path = os.path.abspath(cfg.data.path)
    prepare_data(cfg)  # validates the file and both selections (non-empty)
    loc = storage.parse(cfg.storage.uri)
    cfg.storage.uri = loc.uri  # absolute too, for the same reason as the data path
    storage.check_reachable(loc)
    check_resume_config(cfg, loc.join(cfg.storage.name))
    return loc


def prepare_data(cfg: Config) -> dict:
    """What every worker needs from the data and the driver can compute once: train.h5's
    validate_file summary (workers then skip validating it) and the mean-pose baseline on the
    validation subjects. Remembered per file version, so preflight and build_trainer read the
    file once."""
    train_file = os.path.join(os.path.abspath(cfg.data.path), "train.h5")
    try:
        stat = os.stat(train_file)
    except OSError:
        stat = None
    if stat is None:  # let the dataset raise its one clear DataError
        return _prepare_data(train_file, None, None, tuple(cfg.data.val_subjects),
                             cfg.data.max_train_samples, cfg.data.max_val_samples)
    return _prepare_data(train_file, stat.st_mtime_ns, stat.st_size, tuple(cfg.data.val_subjects),
                         cfg.data.max_train_samples, cfg.data.max_val_samples)


@functools.lru_cache(maxsize=4)
def _prepare_data(train_file, mtime_ns, size, val_subjects, max_train, max_val) -> dict:
    from raypose.dataset import PoseDataset

    train = PoseDataset(train_file, exclude_subjects=list(val_subjects), max_samples=max_train)
    val = PoseDataset(train_file, subjects=list(val_subjects), max_samples=max_val, info=train.info)
    info = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in train.info.items()}
    return {"info": info,
            "baseline": mean_pose_baseline(train.root_relative_poses(), val.root_relative_poses())}


def latest_checkpoint(run: storage.Location) -> storage.Location | None:
    """The checkpoint Ray Train resumes this run from: the latest one in Ray Train's own record of
    finished checkpoints. A folder that an interrupted upload left behind is not in the record and
    never counts; None when the record does not exist (Ray Train starts from scratch then)."""
    from ray.train import Result  # Ray: reads the run's checkpoint record, needs no cluster
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    record = run.join(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    if not storage.exists(record):
        return None  # no checkpoint of this run ever finished
    path, fs = storage.ray_storage(run)
    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except CheckpointManagerInitializationError as e:
        reason = str(e).split(". ")[0].strip()
        raise ConfigError(f"run {run.uri}: Ray Train cannot resume from its checkpoint record "
                          f"{record.uri} ({reason}); use another --name") from None
    if result.checkpoint is None:
        return None
    return run.join(posixpath.basename(result.checkpoint.path.rstrip("/")))


IGNORED_ON_RESUME = ("storage.", "scaling.workers", "scaling.gpu", "scaling.cpus_per_worker",
                     "scaling.compile", "schedule.epochs", "data.path")


def check_resume_config(cfg: Config, run: storage.Location) -> None:
    """The same name resumes; refuse when the stored run was trained with another config."""
    latest = latest_checkpoint(run)
    if latest is None:
        return
    try:
        stored = json.loads(storage.read_text(latest.join(checkpoint.CONFIG_FILE)))
    except FileNotFoundError:
        raise ConfigError(f"run {run.uri} has a checkpoint without {checkpoint.CONFIG_FILE} "
                          f"({latest.uri}); use another --name") from None
    ours = flatten(cfg.to_dict())
    theirs = flatten(stored)
    diff = sorted(k for k in set(ours) | set(theirs)
                  if ours.get(k) != theirs.get(k) and not k.startswith(IGNORED_ON_RESUME))
    if diff:
        details = ", ".join(f"{k}: stored {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff)
        raise ConfigError(f"run {run.uri} exists with another config ({details}); "
                          "resume with the same settings or use another --name")


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Connecting to Ray, and the checks once connected


def forwarded_env() -> dict:
    """Variables the workers need to reach the same storage. Credentials are not copied here:
    workers inherit them from the node's environment (or the job's runtime_env), never from a
    config that could be logged."""
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
            if k in os.environ}


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to RAY_ADDRESS / address if given, else start a local instance (with its
    dashboard). Token authentication: Ray's own default applies (see README)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"configure_logging": True, "logging_level": "WARNING"}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def check_gpu_available(cfg: Config) -> None:
    """--gpu needs GPUs in the cluster; checked after connecting, before any worker starts."""
    import ray

    if cfg.scaling.gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < 1:
            raise ConfigError("--gpu was given but the Ray cluster has no GPU "
                              f"(resources: {ray.cluster_resources()}); drop --gpu to train on CPU")
