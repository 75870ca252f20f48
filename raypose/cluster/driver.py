"""The driver-side steps that `raypose train`, `raypose tune` and `raypose evaluate` share: checks
that need no cluster (preflight), connecting to Ray, and the checks made once connected.

Where Ray plugs in is marked `# Ray:`.  Nothing here runs on a worker.
"""

import contextlib
import functools
import json
import os
import posixpath
import re
import sys
import time

from raypose import console, storage
from raypose.cluster import capacity
from raypose.cluster.capacity import Capacity
from raypose.config import Config, ConfigError, flatten
from raypose.data import cache as datacache
from raypose.model.metrics import mean_pose_baseline
from raypose.storage import checkpoint
from raypose.storage import retry as storage_retry

# ----------------------------------------------------------------------------------------------
# Before Ray starts: config, data, storage, resume


def preflight(cfg: Config, create: bool = True) -> storage.Location:
    """Every check that needs no cluster: config ranges, data files and splits, storage.
    Raises one clear error before Ray starts anything. Makes the data path and a local
    storage path absolute. create=False: a local storage folder that does not exist is an error
    instead of being made (a resume, which needs what is there)."""
    cfg.validate()
    check_elastic_supported(cfg)
    # workers (and Tune trials, which run in their own folders) see the driver's data by an
    # absolute path
    cfg.data.path = datacache.absolute(cfg.data.path)
    data = prepare_data(cfg)  # validates the file and both selections (non-empty)
    if cfg.data.epoch_samples > data["train_samples"]:
        raise ConfigError(
            f"data.epoch_samples: {cfg.data.epoch_samples} is more than the "
            f"{data['train_samples']} samples of the training split of "
            f"{cfg.data.path}/train.h5 (0 trains on all of them every epoch)"
        )
    # each worker takes whole batches from its 1/workers share of an epoch (loop.steps_in_epoch,
    # drop_last): fewer samples than one batch per worker is an epoch without a training step,
    # whose loss would be NaN. An elastic group is checked at its largest, where shares are least.
    samples = cfg.data.epoch_samples or data["train_samples"]
    workers = cfg.scaling.workers
    if cfg.data.batch_size * workers > samples:
        where = (
            "data.epoch_samples"
            if cfg.data.epoch_samples
            else f"the training split of {cfg.data.path}/train.h5"
        )
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} per worker with {workers} "
            f"worker(s) needs {cfg.data.batch_size * workers} samples per epoch, "
            f"but an epoch has {samples} ({where}), so it would take no training "
            "step; lower data.batch_size or the number of workers",
            key="data.batch_size",
        )
    if cfg.data.augment and cfg.data.flip and not data["info"].get("mirror_consistent", True):
        print(
            f"[raypose] {cfg.data.path}: train.h5 has mirror_consistent=false (a fixed "
            "side-colour code), so training runs without the left/right flip",
            flush=True,
        )
    loc = storage.parse(cfg.storage.uri)
    cfg.storage.uri = loc.uri  # absolute too, for the same reason as the data path
    storage.check_reachable(loc, create=create)
    check_resume_config(cfg, loc.join(cfg.storage.name))
    return loc


def elastic_supported() -> bool:
    """Whether the installed Ray Train runs elastic groups (ScalingConfig(num_workers=(min, max)),
    from Ray 2.55): its ScalingConfig then has elastic_resize_monitor_interval_s."""
    import dataclasses

    from ray.train import ScalingConfig

    return any(
        f.name == "elastic_resize_monitor_interval_s" for f in dataclasses.fields(ScalingConfig)
    )


def check_elastic_supported(cfg: Config) -> None:
    """An elastic group (MIN:MAX workers) on a Ray release without elastic Ray Train is refused
    in one line before anything starts."""
    low, high = cfg.worker_range()
    if low != high and not elastic_supported():
        import ray

        raise ConfigError(
            f"--workers / --workers-per-trial {low}:{high}: elastic worker groups "
            f"need Ray 2.55 or later (this is Ray {ray.__version__}); give a fixed "
            "number of workers"
        )


def prepare_data(cfg: Config) -> dict:
    """What every worker needs from the data and the driver can compute once: train.h5's
    validate_file summary (workers then skip validating it) and the mean-pose baseline on the
    validation subjects. Remembered per file version, so preflight and build_trainer read the
    file once."""
    # for s3://..., the driver's own verified copy in this node's cache (see raypose.data.cache)
    train_file = str(
        datacache.local_data_dir(datacache.absolute(cfg.data.path), ("train.h5",)) / "train.h5"
    )
    try:
        stat = os.stat(train_file)
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:  # let the dataset raise its one clear DataError
        version = (None, None)
    return _prepare_data(
        train_file,
        *version,
        tuple(cfg.data.val_subjects),
        cfg.data.val_sequence_every,
        tuple(cfg.data.actions),
        cfg.data.max_train_samples,
        cfg.data.max_val_samples,
    )


@functools.lru_cache(maxsize=4)
def _prepare_data(
    train_file, mtime_ns, size, val_subjects, val_sequence_every, actions, max_train, max_val
) -> dict:
    """baseline: None when the run holds nothing out for validation."""
    from raypose.data.dataset import PoseDataset, has_validation

    split = {
        "val_subjects": list(val_subjects),
        "val_sequence_every": val_sequence_every,
        "actions": list(actions) or None,
    }
    train = PoseDataset(train_file, split="train", max_samples=max_train, **split)
    info = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in train.info.items()}
    baseline = None
    if has_validation(val_subjects, val_sequence_every):
        val = PoseDataset(
            train_file, split="validation", max_samples=max_val, info=train.info, **split
        )
        baseline = mean_pose_baseline(train.root_relative_poses(), val.root_relative_poses())
    return {"info": info, "train_samples": len(train), "baseline": baseline}


@contextlib.contextmanager
def _ray_train_quiet():
    """Ray Train's INFO lines while raypose reads a run's record before Ray starts ("A run
    snapshot was found ..."): not for the terminal, where no log file has taken them yet."""
    import logging

    logger = logging.getLogger("ray.train")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def latest_checkpoint(run: storage.Location) -> storage.Location | None:
    """The checkpoint Ray Train resumes this run from: the latest one in Ray Train's own record of
    finished checkpoints. A folder that an interrupted upload left behind is not in the record and
    never counts; None when the record does not exist (Ray Train starts from scratch then)."""
    from ray.train import Result  # Ray: reads the run's checkpoint record, needs no cluster

    from raypose.cluster.ray_internals import CHECKPOINT_RECORD

    record = run.join(CHECKPOINT_RECORD)
    if not storage.exists(record):
        return None  # no checkpoint of this run ever finished
    path, fs = storage_retry.ray_storage(run)
    try:
        with _ray_train_quiet():
            result = Result.from_path(path, storage_filesystem=fs)
    except Exception as e:  # Ray's error for a record it cannot read
        reason = str(e).split(". ")[0].strip()[:300]
        raise ConfigError(
            f"run {run.uri}: Ray Train cannot resume from its checkpoint record "
            f"{record.uri} ({reason}); use another --name"
        ) from None
    if result.checkpoint is None:
        return None
    return run.join(posixpath.basename(result.checkpoint.path.rstrip("/")))


def recorded_checkpoints(run: storage.Location) -> set[str]:
    """The names of the checkpoint folders in Ray Train's record of the run (those it keeps)."""
    from ray.train import Result  # Ray: reads the run's checkpoint record, needs no cluster

    from raypose.cluster.ray_internals import CHECKPOINT_RECORD

    if not storage.exists(run.join(CHECKPOINT_RECORD)):
        return set()
    path, fs = storage_retry.ray_storage(run)
    with _ray_train_quiet():
        result = Result.from_path(path, storage_filesystem=fs)
    return {posixpath.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or ()}


def remove_unrecorded(run: storage.Location) -> list[str]:
    """Remove the checkpoint folders of a stopped run that Ray Train's record does not hold (an
    upload cut by the stop, or one that finished after the last record); returns their names."""
    fs = storage.filesystem(run)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(run.path, detail=False)]
    except FileNotFoundError:
        return []
    recorded = recorded_checkpoints(run)
    gone = sorted(n for n in names if re.fullmatch(r"epoch_\d+", n) and n not in recorded)
    for name in gone:
        fs.rm(run.join(name).path, recursive=True)
    return gone


def shutdown_ray(timeout: float = 4.0) -> bool:
    """ray.shutdown(), bounded: after a signal to the whole process group (Ctrl-C in a terminal,
    `ray job stop`) Ray's own processes may be gone already, and the shutdown can then wait a
    minute for them. False when it did not finish within timeout."""
    import threading

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return True
    done = threading.Event()

    def stop():
        try:
            ray.shutdown()
        finally:
            done.set()

    threading.Thread(target=stop, name="raypose-ray-shutdown", daemon=True).start()
    finished = done.wait(timeout)
    if _Connection.local:
        # the instance this process started: none of its processes outlives the command (a
        # worker whose raylet a group-wide signal ended takes a while to notice)
        import psutil

        left = psutil.Process().children(recursive=True)
        for p in left:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        for p in psutil.wait_procs(left, timeout=2.0)[1]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    return finished


class Interrupted(KeyboardInterrupt):
    """A run or sweep stopped by Ctrl-C or SIGTERM; its message says how to resume it."""


def _interrupt(signum, frame):
    console.note_interrupt()


def run_interruptible(work, stopped):
    """work() (a Ray Train or Tune fit) in a thread of its own, while this thread waits for it.

    Ctrl-C (SIGINT) and SIGTERM reach this thread at once instead of Ray's own handlers (Ray
    Train's first Ctrl-C waits for a graceful abort while epochs go on; Tune's saves and stops
    the trials one by one): raypose disconnects from Ray, which ends the run's controller and
    workers with their owner (a local instance that init_ray started stops whole), then calls
    stopped(), which tidies storage and returns the line that says how to resume; that line is
    printed and Interrupted raised (raypose.cli exits 130)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return work()  # signals reach only the main thread: nothing to take over
    outcome = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    # Tune would install its own SIGINT handler, which a thread other than the main one cannot
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    thread = threading.Thread(target=target, name="raypose-fit", daemon=True)
    try:
        if console.interrupted():  # a stop that landed in Ray's start-up calls and was lost there
            raise KeyboardInterrupt
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if console.interrupted():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        began = time.monotonic()
        from raypose.console import say

        say("[raypose] interrupted: stopping the workers")
        shutdown_ray()
        if thread.ident is not None:  # started: the stop may have come before it was
            thread.join(5.0)  # the fit's last storage writes
        line = stopped()
        say(f"[raypose] {line} (stopped in {time.monotonic() - began:.1f} s)")
        raise Interrupted(line) from None
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# how many workers a run has, where they sit and how long it waits for them may change between
# invocations of one run (and do change in an elastic one); the model and data settings may not
IGNORED_ON_RESUME = (
    "storage.",
    "scaling.workers",
    "scaling.min_workers",
    "scaling.placement",
    "scaling.resize_interval_s",
    "scaling.autoscaler_wait_s",
    "scaling.gpu",
    "scaling.cpus_per_worker",
    "scaling.compile",
    "schedule.epochs",
    "data.path",
    # how the same batches reach the device (raypose.data.resident gives the host feed's batches)
    "data.feed",
    "data.reader_threads",
)


def check_resume_config(cfg: Config, run: storage.Location) -> None:
    """The same name resumes; refuse when the stored run was trained with another config."""
    latest = latest_checkpoint(run)
    if latest is None:
        return
    try:
        stored = json.loads(storage.read_text(latest.join(checkpoint.CONFIG_FILE)))
    except FileNotFoundError:
        raise ConfigError(
            f"run {run.uri} has a checkpoint without {checkpoint.CONFIG_FILE} "
            f"({latest.uri}); use another --name"
        ) from None
    ours = flatten(cfg.to_dict())
    theirs = stored_settings(stored)
    diff = sorted(
        k
        for k in set(ours) | set(theirs)
        if ours.get(k) != theirs.get(k) and not k.startswith(IGNORED_ON_RESUME)
    )
    if diff:
        details = ", ".join(f"{k}: stored {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff)
        raise ConfigError(
            f"run {run.uri} exists with another config ({details}); "
            "resume with the same settings or use another --name"
        )


def stored_settings(stored: dict) -> dict:
    """A stored config (a checkpoint's or a sweep's), flattened, with the keys it predates at
    their defaults: a setting added since behaves as the default did, so runs and sweeps from
    before it still resume."""
    return {**flatten(Config().to_dict()), **flatten(stored)}


# ----------------------------------------------------------------------------------------------
# Connecting to Ray, and the checks once connected


def forwarded_env() -> dict:
    """Variables the workers need to reach the same storage. Credentials are not copied here:
    workers inherit them from the node's environment (or the job's runtime_env), never from a
    config that could be logged."""
    return {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
        if k in os.environ
    }


def init_ray(address: str | None = None, num_cpus: int | None = None, command: str = "raypose"):
    """Connect to RAY_ADDRESS / address if given, else start a local instance (with its
    dashboard). Token authentication: Ray's own default applies (see docs/cluster.md). An address
    is checked first (its form, and that something answers there within
    RAYPOSE_RAY_CONNECT_TIMEOUT), so a wrong one fails in one line instead of hanging in ray.init.
    Ray's own output goes to the log file of raypose.console from then on; the workers' output
    stays in Ray's worker logs unless verbose."""
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
    kwargs = {
        "configure_logging": console.verbose(),
        "log_to_driver": console.verbose(),
        "logging_level": "INFO" if console.verbose() else "WARNING",
    }
    if address:
        _connect(address, kwargs)
        _Connection.local = False
    else:
        # "local": a new instance even where another runs on this host or a `ray start` left
        # its address file behind (ray.init() would join that one, or hang on a dead one)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **kwargs,
        )
        _Connection.local = True
    console.route_ray_output(command)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # ray.init installs SIGTERM handlers (Python's sys.exit, and its core worker's, which
        # aborts the process and would leave a local instance running): SIGTERM stops raypose
        # as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)


CLIENT_CONNECT_TRIES = 3


def _connect(address: str, kwargs: dict) -> None:
    """ray.init(address): a Ray Client server (ray://) that fails to start the session's own
    server (ConnectionAbortedError "Initialization failure from server", e.g. its proxier
    reading a process that has just exited) is tried again, up to CLIENT_CONNECT_TRIES times;
    the next connection gets a new server."""
    import ray

    for attempt in range(1, CLIENT_CONNECT_TRIES + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except ConnectionAbortedError:
            ray.shutdown()
            if not address.startswith("ray://") or attempt == CLIENT_CONNECT_TRIES:
                raise
            time.sleep(2.0 * attempt)


class _Connection:
    local = False  # whether init_ray started the Ray instance itself (then no autoscaler runs)


def check_resources(cfg: Config, flags: str, what: str = "the run") -> Capacity:
    """capacity.check_resources for the Ray instance init_ray connected to."""
    return capacity.check_resources(cfg, flags, what, local=_Connection.local)


def state_api_available() -> bool:
    """Whether the connected cluster answers Ray's State API, which its dashboard serves.

    A Ray Train run's placement group can outlive the run: a driver that is interrupted, or a
    sweep trial that ASHA stops (Tune ends the trial's process, and with it the run's
    controller). Ray Train gives every run a detached cleaner that removes the group once the
    State API says the run's controller is dead; without the State API the CPUs and GPUs stay
    reserved until the cluster restarts."""
    import ray

    from raypose.cluster.ray_internals import ServerUnavailable, list_actors  # the dashboard's API

    if ray.util.client.ray.is_connected():
        return True  # Ray Client: the cluster's own side runs Train; nothing to ask from here
    try:
        # this driver's cluster, not whichever other Ray instance runs on the host
        list_actors(
            address=ray.get_runtime_context().gcs_address,
            limit=1,
            timeout=30,
            raise_on_missing_output=False,
        )
    except ServerUnavailable:
        return False
    return True


def check_state_api(sweep: bool = False) -> None:
    """Without the State API, a single run says in one line that an interrupted run's resources
    stay reserved, and goes on; a sweep is refused, since every trial that ASHA stops would keep
    its CPUs and GPUs and the sweep would stall."""
    if state_api_available():
        return
    import ray

    where = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    fix = (
        "start the head with its dashboard (`ray start --head` without "
        "--include-dashboard=false, with ray[default] installed)"
    )
    if sweep:
        raise ConfigError(
            f"{where} has no dashboard (no State API): Ray Train frees the CPUs and "
            "GPUs of a trial that ASHA stops through the State API, so without it "
            f"the sweep would stall; {fix}"
        )
    print(
        f"[raypose] warning: {where} has no dashboard (no State API): Ray Train frees the CPUs "
        "and GPUs of a run that ends without doing so (an interrupted driver) through the State "
        "API, which the dashboard serves; if this run is interrupted, its resources stay "
        f"reserved until the cluster restarts; {fix}",
        flush=True,
    )
