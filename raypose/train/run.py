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
from raypose.config import (
    Config,
    ConfigError,
    gpus_per_worker_arg,
    load_config,
    parse_gpus_per_worker,
    set_gpus_per_worker,
    set_workers,
)
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
        # Ray: a share below 1 packs 1 / share single-worker runs (a sweep's trials) on one GPU
        resources["GPU"] = cfg.scaling.gpu_share
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
        torch_config=TorchConfig(**_process_group(cfg)),
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


def _process_group(cfg: Config) -> dict:
    """TorchConfig's settings: Ray's default backend (NCCL with GPUs, gloo without), except for a
    fixed group of one worker, which has nothing to all-reduce: gloo, so that a worker that Ray
    gives a GPU share on a node without CUDA starts, and trains on the CPU
    (raypose.train.packing.training_device), instead of failing to set up NCCL."""
    return {"backend": "gloo"} if cfg.worker_range() == (1, 1) else {}


def check_gpu_packing(cfg: Config, flags: str, data: dict | None = None) -> dict | None:
    """Before any trial or run starts, for a GPU share below 1: one Ray task on a GPU share
    measures a training step of the run's model at its batch size there
    (raypose.train.packing.probe_training_step), and packing.check_packing refuses in one line a
    packing that would not fit that GPU's memory. Skipped (None) without a share below 1, and
    when the task finds no CUDA device (the workers then train on the CPU)."""
    if not cfg.scaling.gpu or cfg.scaling.gpu_share >= 1.0:
        return None
    import ray

    from raypose.train import packing

    # Ray: one task on the share a worker gets, before any worker; its process ends with it
    # (max_calls=1), so no idle worker keeps a CUDA context on the GPU the trials share
    probe = ray.get(
        ray.remote(num_cpus=0, num_gpus=cfg.scaling.gpu_share, max_retries=0, max_calls=1)(
            packing.probe_training_step
        ).remote(cfg.to_dict())
    )
    if probe is None:
        print(
            "[raypose] the GPU memory check of the packing was skipped: the probe on a GPU "
            "share found no CUDA device (the workers will train on the CPU)",
            flush=True,
        )
        return None
    samples = (data or prepare_data(cfg))["train_samples"]
    figures = packing.check_packing(cfg, probe, samples, flags)
    print(
        f"[raypose] {figures['trials_per_gpu']} per GPU fit: a training step at batch "
        f"{probe['batch_size']} peaked at {probe['peak_reserved_bytes'] / 1e9:.2f} GB on the "
        f"{probe['device_name']} ({probe['total_bytes'] / 1e9:.0f} GB)",
        flush=True,
    )
    return figures


def run_training(cfg: Config, stop_after_epoch: int = 0, address: str | None = None):
    """Checks, then the trainer; returns Ray's Result."""
    loc = preflight(cfg)
    with runlock.hold(loc, cfg.storage.name, "raypose train"):  # before Ray starts
        return _run_locked(cfg, loc, stop_after_epoch, address)


def _run_locked(cfg: Config, loc: storage.Location, stop_after_epoch: int, address: str | None):
    init_ray(address, command="train")
    check_state_api()
    flags = "--workers and --gpu" if cfg.scaling.gpu else "--workers"
    check_resources(cfg, flags)
    check_gpu_packing(cfg, flags)
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
    scored = (
        f"val_mpjpe {metrics['val_mpjpe']:.1f} mm "
        f"(mean pose {metrics.get('val_mean_pose_mpjpe', float('nan')):.1f} mm), "
        if "val_mpjpe" in metrics
        else "no validation split (the last checkpoint is the run's result), "
    )
    print(
        f"[raypose] run {cfg.storage.name}: {metrics.get('epoch', '?')} epochs, {scored}"
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
    parser.add_argument(
        "--gpus-per-worker",
        type=gpus_per_worker_arg,
        default=None,
        metavar="G",
        help="0, 1, or a share 1/k of one GPU (0.5, 0.25, 0.125, 0.0625) so that k runs of one "
        "worker each share a GPU (--gpu is 1)",
    )
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
    if args.gpus_per_worker is not None:
        if args.gpu and parse_gpus_per_worker(args.gpus_per_worker, "--gpus-per-worker") == 0:
            raise ConfigError("--gpu asks for a GPU and --gpus-per-worker 0 for none; give one")
        set_gpus_per_worker(cfg, args.gpus_per_worker, "--gpus-per-worker", sources)
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
