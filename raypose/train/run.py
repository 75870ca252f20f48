"""Data-parallel training on Ray Train (Train V2), checkpoints in object storage.

Where Ray plugs in is marked `# Ray:`.  What each worker runs is raypose.train.worker; the per-step work
is raypose.train.loop, which has no Ray in it. This module does not import torch.

Storage layout of a run:  <storage>/<name>/epoch_0001/{model.pt, optimizer.pt, config.json,
state.json, manifest.json}, ...  plus Ray Train's own record of finished checkpoints
(checkpoint_manager_snapshot.json).  The same --name and --storage resume from the latest checkpoint
in that record; FailureConfig(max_failures) restarts a lost worker group from it.
"""

import posixpath
import time

from raypose import console, storage, validate
from raypose.cluster import nodes
from raypose.cluster.driver import (
    check_resources,
    check_state_api,
    forwarded_env,
    init_ray,
    latest_checkpoint,
    preflight,
    prepare_data,
    remove_unrecorded,
    run_interruptible,
)
from raypose.config import Config, ConfigError, load_config, set_workers
from raypose.storage import retry as storage_retry
from raypose.storage import runlock

# ----------------------------------------------------------------------------------------------
# Runs on each Ray Train worker: raypose.train.worker, imported there (it imports torch)


def train_func_per_worker(loop_config: dict) -> None:
    """The Ray Train worker's loop (raypose.train.worker.train_loop), imported on the worker: the
    driver never needs torch."""
    from raypose.train.worker import train_loop

    train_loop(loop_config)


# ----------------------------------------------------------------------------------------------
# Runs on the driver


def build_trainer(
    cfg: Config,
    run_name: str,
    loc: storage.Location,
    callbacks=(),
    stop_after_epoch: int = 0,
    created_at: float | None = None,
    data: dict | None = None,
    lines=None,
):
    """The Ray Train trainer for one run (also used by each Tune trial): Ray's `TorchTrainer`
    with its `TorchConfig`, Ray's default callbacks and controller settings.

    created_at: time.time() when the caller started the run (default: now); workers report
    startup_seconds, the wall time from it to their first training step. data: prepare_data's
    result when the caller has it already (a sweep computes it once on its driver). lines: a
    console.LineRelay handle that rank 0 sends its raypose lines to (the driver prints them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = storage_retry.ray_storage(loc)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpu:
        resources["GPU"] = 1
    workers = cfg.worker_range()
    scaling = {
        "num_workers": workers if workers[0] != workers[1] else workers[1],
        "use_gpu": cfg.scaling.gpu,
        "resources_per_worker": resources,
        "placement_strategy": cfg.scaling.placement,
    }
    if workers[0] != workers[1]:  # Ray: elastic (driver.check_elastic_supported)
        scaling["elastic_resize_monitor_interval_s"] = cfg.scaling.resize_interval_s
    return TorchTrainer(  # Ray: the data-parallel run
        train_func_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "stop_after_epoch": stop_after_epoch,
            "data": prepare_data(cfg) if data is None else data,
            # the storage endpoint for raypose's own uploads on the workers
            # (never credentials: those come from the node's environment)
            "storage_env": forwarded_env(),
            "lines": lines,
            "run_uri": loc.join(run_name).uri,
            "trainer_created_at": time.time() if created_at is None else created_at,
        },
        torch_config=TorchConfig(),
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.storage.max_failures),
            # keep the best K by checkpoint_score (val_mpjpe with a regression head, see
            # NO_REGRESSION_HEAD_SCORE); Ray Train always keeps the latest as well, for resume
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.storage.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="min",
            ),
            callbacks=list(callbacks),
        ),
    )


def run_training(cfg: Config, stop_after_epoch: int = 0, address: str | None = None):
    """Checks, then the trainer; returns Ray's Result."""
    loc = preflight(cfg)
    with runlock.hold(loc, cfg.storage.name, "raypose train"):  # before Ray starts
        return _run_locked(cfg, loc, stop_after_epoch, address)


def _run_locked(cfg: Config, loc: storage.Location, stop_after_epoch: int, address: str | None):
    init_ray(address, command="train")
    check_state_api()
    check_resources(cfg, "--workers and --gpu" if cfg.scaling.gpu else "--workers")
    nodes.check_nodes(cfg, loc)  # every node that can host a worker sees the data and the storage
    start = time.perf_counter()
    run = loc.join(cfg.storage.name)

    def stopped() -> str:
        removed = remove_unrecorded(run)
        latest = latest_checkpoint(run)
        kept = (
            f"its last recorded checkpoint is {posixpath.basename(latest.path)}"
            if latest
            else "no checkpoint was recorded"
        )
        tidied = f"; removed the unrecorded {', '.join(removed)}" if removed else ""
        return (
            f"run {cfg.storage.name} stopped: {kept}{tidied}; the same command (--name "
            f"{cfg.storage.name} --storage {loc.uri}) resumes it"
        )

    with console.quiet(), console.LineRelay() as lines:
        trainer = build_trainer(
            cfg, cfg.storage.name, loc, stop_after_epoch=stop_after_epoch, lines=lines.handle
        )
        result = run_interruptible(trainer.fit, stopped)
    metrics = result.metrics or {}
    print(
        f"[raypose] run {cfg.storage.name}: {metrics.get('epoch', '?')} epochs, "
        f"val_mpjpe {metrics.get('val_mpjpe', float('nan')):.1f} mm "
        f"(mean pose {metrics.get('val_mean_pose_mpjpe', float('nan')):.1f} mm), "
        f"{time.perf_counter() - start:.0f} s; checkpoints under {loc.join(cfg.storage.name).uri}"
    )
    return result


# ----------------------------------------------------------------------------------------------
# Command line: raypose train / jobs/train.py


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        help="directory with train.h5 (and test.h5), or s3://bucket/prefix "
        "holding them and their manifest.json",
    )
    parser.add_argument(
        "--storage", help="experiment storage: a path, file://... or s3://bucket/prefix"
    )
    parser.add_argument("--name", help="run name under --storage; the same name resumes")
    parser.add_argument("--epochs", type=int)
    parser.add_argument(
        "--workers",
        help="Ray Train workers (data-parallel): N, or MIN:MAX for an "
        "elastic group that shrinks when nodes are lost and grows back",
    )
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--schedule", choices=["joint", "pretrain"])
    parser.add_argument("--config", help="YAML file with config overrides")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set lrn_alpha=0.001 (repeatable)",
    )
    parser.add_argument(
        "--stop-after-epoch",
        type=int,
        default=0,
        metavar="N",
        help="stop this invocation after epoch N; the same --name resumes later",
    )
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local instance)")


FLAG_KEYS = (
    ("data", "data.path"),
    ("storage", "storage.uri"),
    ("name", "storage.name"),
    ("epochs", "schedule.epochs"),
    ("gpu", "scaling.gpu"),
    ("schedule", "schedule.kind"),
)


def config_from_args(args) -> Config:
    """The run's config from --config, --set and the flags; every error names what the user typed
    (the flag, `--set KEY=VALUE` or the config file)."""
    from raypose.config import set_value

    if args.name is not None:
        validate.check_name(args.name, "--name")
    if args.stop_after_epoch < 0:
        raise ConfigError(f"--stop-after-epoch must be >= 0, got {args.stop_after_epoch}")
    sources = {}
    cfg = load_config(args.config, args.overrides, sources=sources)
    for flag, key in FLAG_KEYS:
        value = getattr(args, flag)
        if value is not None:
            set_value(cfg, key, value, f"--{flag}")
            sources[key] = f"--{flag.replace('_', '-')}"
    if args.workers is not None:  # N or MIN:MAX (elastic)
        set_workers(cfg, args.workers, "--workers", sources)
    cfg.validate(sources)
    storage.data_location(cfg.data.path, sources.get("data.path", "data.path"))
    storage.storage_location(cfg.storage.uri, sources.get("storage.uri", "storage.uri"))
    return cfg


def run(args) -> int:
    # raypose's errors (config, data, storage, checkpoint) reach raypose.cli.main, which prints
    # them as one line and exits 2
    cfg = config_from_args(args)
    validate.ray_address_from(args.address)  # before any data is read or storage made
    # a failed run raises from the trainer's fit (Train V2), so reaching here means it finished
    run_training(cfg, stop_after_epoch=args.stop_after_epoch, address=args.address)
    return 0
