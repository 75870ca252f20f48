"""The driver-side steps that `raypose train`, `raypose tune` and `raypose evaluate` share: checks
that need no cluster (preflight), connecting to Ray, and the checks made once connected.

Where Ray plugs in is marked `# Ray:`.  Nothing here runs on a worker.
"""

import dataclasses
import functools
import json
import os
import posixpath
import time

from raypose import checkpoint, datacache, storage
from raypose.config import Config, ConfigError
from raypose.metrics import mean_pose_baseline

# Ray Train V2's switch for its per-run PreemptionWatcher (ray/train/v2/_internal/constants.py)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# How often Ray Train's controller polls its workers for reports and for the end of the run
# (Ray's default 2 s); raypose.train.build_trainer sets raypose's default
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


# ----------------------------------------------------------------------------------------------
# Before Ray starts: config, data, storage, resume


def preflight(cfg: Config) -> storage.Location:
    """Every check that needs no cluster: config ranges, data files and splits, storage.
    Raises one clear error before Ray starts anything. Makes the data path and a local
    storage path absolute."""
    cfg.validate()
    # workers (and Tune trials, which run in their own folders) see the driver's data by an
    # absolute path
    cfg.data.path = datacache.absolute(cfg.data.path)
    data = prepare_data(cfg)  # validates the file and both selections (non-empty)
    if cfg.data.epoch_samples > data["train_samples"]:
        raise ConfigError(f"data.epoch_samples: {cfg.data.epoch_samples} is more than the "
                          f"{data['train_samples']} samples of the training split of "
                          f"{cfg.data.path}/train.h5 (0 trains on all of them every epoch)")
    if cfg.data.augment and cfg.data.flip and not data["info"].get("mirror_consistent", True):
        print(f"[raypose] {cfg.data.path}: train.h5 has mirror_consistent=false (a fixed "
              "side-colour code), so training runs without the left/right flip", flush=True)
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
    # for s3://..., the driver's own verified copy in this node's cache (see raypose.datacache)
    train_file = str(datacache.local_data_dir(datacache.absolute(cfg.data.path), ("train.h5",))
                     / "train.h5")
    try:
        stat = os.stat(train_file)
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:  # let the dataset raise its one clear DataError
        version = (None, None)
    return _prepare_data(train_file, *version, tuple(cfg.data.val_subjects),
                         cfg.data.max_train_samples, cfg.data.max_val_samples)


@functools.lru_cache(maxsize=4)
def _prepare_data(train_file, mtime_ns, size, val_subjects, max_train, max_val) -> dict:
    from raypose.dataset import PoseDataset

    train = PoseDataset(train_file, exclude_subjects=list(val_subjects), max_samples=max_train)
    val = PoseDataset(train_file, subjects=list(val_subjects), max_samples=max_val, info=train.info)
    info = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in train.info.items()}
    return {"info": info, "train_samples": len(train),
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


# how many workers a run has, where they sit and how long it waits for them may change between
# invocations of one run (and do change in an elastic one); the model and data settings may not
IGNORED_ON_RESUME = ("storage.", "scaling.workers", "scaling.min_workers", "scaling.placement",
                     "scaling.resize_interval_s", "scaling.autoscaler_wait_s", "scaling.gpu",
                     "scaling.cpus_per_worker", "scaling.compile", "schedule.epochs", "data.path")


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


def init_ray(address: str | None = None, num_cpus: int | None = None, command: str = "raypose"):
    """Connect to RAY_ADDRESS / address if given, else start a local instance (with its
    dashboard). Token authentication: Ray's own default applies (see README).  An address is
    checked first (its form, and that something answers there within
    RAYPOSE_RAY_CONNECT_TIMEOUT), so a wrong one fails in one line instead of hanging in ray.init.
    Ray's own output goes to the log file of raypose.console from then on."""
    import ray

    from raypose import console
    from raypose import validate as inputs

    if ray.is_initialized():
        return
    address = inputs.ray_address_from(address)
    console.open_log(command)
    console.route_loggers()
    # Ray's own logging setup would add a stderr handler again; console.route_loggers has
    # already sent its loggers to the log file
    kwargs = {"configure_logging": console.verbose(),
              "logging_level": "INFO" if console.verbose() else "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray starts its worker processes at niceness 15 (RAY_worker_niceness), below its own
        # daemons and the driver. In an instance raypose starts, the workers are the training
        # itself: on the 2-core machine `raypose bench train` measured the Ray Train loop at 0.92x
        # the plain loop at 15 and 0.97x-1.00x at 0 (README, Speed). A value set by the user is kept.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Train V2 gives every run a PreemptionWatcher actor (one more process that imports Ray
        # Train, then polls the GCS every 5 s) to notice nodes that an autoscaler drains. An
        # instance raypose starts is one node that nothing drains; off unless the user set it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    console.route_ray_output(command)


class ClusterWaitError(RuntimeError):
    """Resources a run asked for could exist, but the autoscaler did not bring them up in time."""


def state_api_available() -> bool:
    """Whether the connected cluster answers Ray's State API, which its dashboard serves.

    A Ray Train run's placement group can outlive the run (an interrupted driver, a controller
    that dies). Ray Train V2 gives every run a detached cleaner that removes the group once the
    State API says the run's controller is dead; without the State API it retries forever and the
    CPUs and GPUs stay reserved: on a 2-CPU head started with --include-dashboard=false a 4-trial
    sweep (1 worker per trial, one at a time, one stopped by ASHA) stalled after its third trial,
    with 2.0 CPU reserved in placement groups and none in use. A sweep no longer relies on it: its
    driver removes those groups itself (raypose.trainer.OrphanedPlacementGroups)."""
    import ray
    from ray.util.state import list_actors  # Ray: answered by the dashboard's API server
    from ray.util.state.exception import ServerUnavailable

    if ray.util.client.ray.is_connected():
        return True  # Ray Client: the cluster's own side runs Train; nothing to ask from here
    try:
        list_actors(limit=1, timeout=30, raise_on_missing_output=False)
    except ServerUnavailable:
        return False
    return True


def check_state_api() -> None:
    """A single run on a cluster without the State API says in one line that an interrupted run's
    resources stay reserved, and goes on. (A sweep needs no State API: see state_api_available.)"""
    if state_api_available():
        return
    import ray

    where = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    print(f"[raypose] warning: {where} has no dashboard (no State API): Ray Train frees the CPUs "
          "and GPUs of a run that ends without doing so (an interrupted driver) through the State "
          "API, which the dashboard serves; if this run is interrupted, its resources stay "
          "reserved until the cluster restarts; start the head with its dashboard (`ray start "
          "--head` without --include-dashboard=false, with ray[default] installed)", flush=True)


def worker_bundle(cfg: Config) -> dict:
    """What one Ray Train worker asks for."""
    bundle = {"CPU": float(cfg.scaling.cpus_per_worker)}
    if cfg.scaling.gpu:
        bundle["GPU"] = 1.0
    return bundle


def fits(node: dict, bundle: dict) -> int:
    """How many bundles fit on a node with these total resources."""
    counts = [int(node.get(k, 0) // v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _brief(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU", "memory", "object_store_memory")
        and not k.startswith("node:") and not k.startswith("accelerator_type:"))
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}"


@dataclasses.dataclass
class Capacity:
    """Ray Train workers of one bundle that the cluster holds now and can ever hold.

    most: None when an autoscaler runs whose node types raypose cannot read (then nothing is
    refused, and a wait for resources gives up after scaling.autoscaler_wait_s)."""
    now: int
    most: int | None
    offer: str  # what the cluster offers, for messages


def cluster_capacity(bundle: dict) -> Capacity:
    """Workers of `bundle` on the nodes that are up, and the most the cluster can scale to.

    ray.cluster_resources() counts only nodes that are up: an autoscaling cluster whose GPU nodes
    start at zero shows no GPU at all. The maximum comes, like Ray Train's own feasibility check
    (WorkerGroup._check_cluster_resources_and_raise_if_insufficient), from the cluster config the
    autoscaler reports to the GCS (ray-project/ray#49501, #49568). Ray 2.60's own autoscalers
    (cluster launcher, KubeRay, the fake multi-node provider) do not report it, so raypose then
    reads the node types from the autoscaler's config file, found on the command line of the
    head's autoscaler monitor. No monitor with a config file there means no autoscaler: what is
    up is all there will be. A monitor that runs elsewhere (KubeRay's autoscaler sidecar) leaves
    the maximum unknown."""
    import ray
    from ray._private.state import state  # Ray: what Ray Train asks (see docstring)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    now = sum(fits(n["Resources"], bundle) for n in nodes)
    up = f"nodes up: {len(nodes)} with {_brief(ray.cluster_resources())}"
    reported = state.get_max_resources_from_cluster_config()
    if reported:
        most = fits(reported, bundle)
        return Capacity(now, max(now, most), f"{up}; the cluster config allows at most {_brief(reported)}")
    head = next((n for n in nodes if "node:__internal_head__" in n["Resources"]), None)
    config = _autoscaler_config(head["NodeID"]) if head is not None else {"found": False}
    if not config["found"]:
        return Capacity(now, None, f"{up}; an autoscaler runs outside the head node "
                        "(its node types are unknown here)")
    if config["path"] is None:
        return Capacity(now, now, f"{up}; no autoscaler (what is up is all there is)")
    types = config["node_types"]
    head_type = config["head_node_type"]
    # the head is up (counted in `now` with the others); each worker type can add max_workers
    # nodes, within the cluster-wide max_workers
    left = config["max_workers"]
    extra = 0
    described = []
    for name, t in sorted(types.items(), key=lambda kv: -fits(kv[1]["resources"], bundle)):
        count = t["max_workers"] if name != head_type else 0
        described.append(f"{name} {_brief(t['resources'])} x{count if name != head_type else 1}")
        if left is not None:
            count = min(count, left)
            left -= count
        extra += fits(t["resources"], bundle) * count
    return Capacity(now, now + extra, f"{up}; autoscaler node types (config {config['path']}): "
                    + ", ".join(described))


def _autoscaler_config(head_node_id: str) -> dict:
    """{'found', 'path', 'node_types', 'head_node_type', 'max_workers'} of the autoscaler monitor
    running on the head node for this cluster, read by a task pinned there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gcs_address = ray.get_runtime_context().gcs_address
    probe = ray.remote(num_cpus=0)(_read_autoscaler_config).options(  # Ray: a task on the head
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id, soft=False))
    return ray.get(probe.remote(gcs_address), timeout=120)


def _read_autoscaler_config(gcs_address: str) -> dict:
    """Runs on the head node: the autoscaler config file of this cluster's monitor process."""
    import psutil
    import yaml

    port = gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py"))
                   for part in cmd):
            continue
        address = next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), "")
        if address.rsplit(":", 1)[-1] != port:
            continue  # another Ray cluster's monitor on the same machine
        path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")), None)
        if path is None:
            return {"found": True, "path": None}
        with open(os.path.expanduser(path)) as f:
            config = yaml.safe_load(f)
        default_max = config.get("max_workers")
        types = {name: {"resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
                        "max_workers": int(t.get("max_workers", default_max or 0))}
                 for name, t in (config.get("available_node_types") or {}).items()}
        return {"found": True, "path": path, "node_types": types,
                "head_node_type": config.get("head_node_type"), "max_workers": default_max}
    return {"found": False}


def check_resources(cfg: Config, flags: str, what: str = "the run") -> Capacity:
    """Before any worker starts: refuse what no node type of the cluster can ever provide, in
    one line that says what was asked and what the cluster offers; wait (up to
    scaling.autoscaler_wait_s) for an autoscaler to add what could exist but is not up yet.
    Returns the cluster's capacity for one worker's bundle. flags: the flags that asked, for the
    message."""
    import ray

    bundle = worker_bundle(cfg)
    need, _ = cfg.worker_range()
    capacity = cluster_capacity(bundle)
    if capacity.now >= need:
        return capacity
    asked = f"{need} worker(s) of {_brief(bundle)} for {what}"
    if capacity.most is not None and capacity.most < need:
        raise ConfigError(f"{flags}: {asked}, but the Ray cluster can never offer that "
                          f"(at most {capacity.most} such worker(s); {capacity.offer})")
    wait = cfg.scaling.autoscaler_wait_s
    print(f"[raypose] waiting up to {wait:g} s for the autoscaler to add nodes: {asked}; "
          f"{capacity.offer}", flush=True)
    from ray.autoscaler.sdk import request_resources  # Ray: ask the autoscaler for the nodes

    deadline = time.monotonic() + wait
    request_resources(bundles=[bundle] * need)
    try:
        while True:
            now = sum(fits(n["Resources"], bundle) for n in ray.nodes() if n.get("Alive"))
            if now >= need:
                print(f"[raypose] the cluster now holds {now} such worker(s)", flush=True)
                return Capacity(now, capacity.most, capacity.offer)
            if time.monotonic() >= deadline:
                raise ClusterWaitError(
                    f"gave up after {wait:g} s waiting for the autoscaler: {asked}, and the "
                    f"cluster holds {now} (set scaling.autoscaler_wait_s to wait longer; "
                    "`ray status` shows what the autoscaler is doing)")
            time.sleep(1.0)
    finally:
        # Ray Train's placement group keeps asking from here on; a standing request would keep
        # the nodes up after the run
        request_resources(bundles=[])
