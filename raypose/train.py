"""Data-parallel training on Ray Train (TorchTrainer, Train V2), checkpoints in object storage.

Where Ray plugs in is marked `# Ray:`.  The per-step work is raypose.loop, which has no Ray in it.

Storage layout of a run:  <storage>/<name>/epoch_0001/{model.pt, optimizer.pt, config.json,
state.json, manifest.json}, ...  plus Ray Train's own record of finished checkpoints
(checkpoint_manager_snapshot.json).  The same --name and --storage resume from the latest checkpoint
in that record; FailureConfig(max_failures) restarts a lost worker group from it.
"""

import os
import posixpath
import tempfile
import time

import torch

from raypose import checkpoint, console, nodes, storage
from raypose import validate as inputs  # raypose.loop.validate is the validation epoch
from raypose.config import Config, ConfigError, config_from_dict, load_config, set_workers
from raypose.driver import check_resources, forwarded_env, init_ray, preflight, prepare_data
from raypose.loop import (build_model, build_optimizer, epoch_batches, maybe_compile, open_splits,
                          regression_epochs_done, stage_for_epoch, train_epoch, validate)
from raypose.model import regression_from_pretrained

CHECKPOINT_PREFIX = "epoch_"
# Checkpoints are ranked by `checkpoint_score` (lower is better): val_mpjpe once a regression head
# exists; before that (the detection stage of a pretrain run) val_mpjpe is only the mean-pose
# baseline, so those checkpoints score this instead and are the first that retention drops.
NO_REGRESSION_HEAD_SCORE = 1.0e9


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


# ----------------------------------------------------------------------------------------------
# Runs on each Ray Train worker


def _wrap_ddp(model, device, world_size):
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_func_per_worker(loop_config: dict) -> None:
    import ray  # Ray: worker-side API
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    stop_after = loop_config.get("stop_after_epoch", 0)
    data = loop_config["data"]  # validated on the driver: the file's summary and the baseline
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    train_set, val_set = open_splits(cfg, info=data["info"])
    # a model without a regression head predicts nothing better than the mean pose: its
    # val_mpjpe is reported as this baseline (and ASHA ignores those epochs, see raypose.tune)
    baseline = data["baseline"]

    start_epoch = 0
    best_val = float("inf")  # best val_mpjpe with a regression head so far (the sweep's metric)
    resumed = ray.train.get_checkpoint()  # Ray: latest checkpoint after a restart or resume
    if resumed is not None:
        with resumed.as_directory() as d:
            loaded = checkpoint.load(d, map_location="cpu")
        start_epoch = loaded["state"]["epoch"]
        best_val = loaded["state"].get("best_val_mpjpe_with_head") or best_val
        model = build_model(cfg, loaded["state"]["stage"])
        model.load_state_dict(loaded["model"])
        model.to(device)
        optimizer = build_optimizer(cfg, model)
        optimizer.load_state_dict(loaded["optimizer"])
        if rank == 0:
            print(f"[raypose] resumed from epoch {start_epoch} ({loaded['state']['stage']} stage)",
                  flush=True)
    else:
        model = build_model(cfg, stage_for_epoch(cfg, 0)).to(device)
        optimizer = build_optimizer(cfg, model)
    if cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = maybe_compile(_wrap_ddp(model, device, world_size), cfg)
    startup_seconds = None
    upload = _upload_manifest_last(ctx.get_storage())

    for epoch in range(start_epoch, cfg.schedule.epochs):
        stage = stage_for_epoch(cfg, epoch)
        if stage == "detection" and model.detection is None:
            # a resumed pretrain run whose regression stage began under another --epochs: the
            # detection head is gone, so the run stays in its regression stage
            stage = "regression"
        if stage == "regression" and model.regression is None:
            # pretrain schedule: drop the detection head, fresh regression head, kept trunk
            model = regression_from_pretrained(model)
            if cfg.scaling.channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = build_optimizer(cfg, model)
            train_model = maybe_compile(_wrap_ddp(model, device, world_size), cfg)
        batches = epoch_batches(train_set, cfg, epoch, rank, world_size, device)
        if startup_seconds is None:
            # wall clock from the TorchTrainer's creation (on the driver) to the first step
            startup_seconds = time.time() - loop_config["trainer_created_at"]
        epoch_start = time.perf_counter()
        stats = train_epoch(train_model, optimizer, batches, cfg, stage, device, world_size=world_size)
        val = validate(model, val_set, cfg.data.batch_size, device, cfg, rank, world_size)
        epochs_done = epoch + 1
        metrics = {
            "epoch": epochs_done,
            "epochs_planned": cfg.schedule.epochs,
            # the group's size this epoch (an elastic group shrinks and grows) and where this
            # rank ran: Ray Train's node_rank is derived from IP addresses, which all nodes of one
            # machine share
            "workers": world_size,
            "node_id": ray.get_runtime_context().get_node_id(),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "stage": stage,
            "regression_epochs": regression_epochs_done(cfg, epochs_done),
            "has_regression_head": model.regression is not None,
            **{k: v for k, v in stats.items() if k.startswith("train_")},
            "samples_per_s": world_size * stats["samples"] / max(stats["seconds"], 1e-9),
            "val_mean_pose_mpjpe": baseline,
            "startup_seconds": startup_seconds,
            **val,
            "checkpoint_score": val["val_mpjpe"] if model.regression is not None else NO_REGRESSION_HEAD_SCORE,
        }
        metrics.setdefault("val_mpjpe", baseline)
        # every rank computes the same decision from all-reduced metrics; only epochs with a
        # regression head count (a detection stage's val_mpjpe is the mean-pose baseline)
        is_best = model.regression is not None and metrics["val_mpjpe"] < best_val
        if is_best:
            best_val = metrics["val_mpjpe"]
        # the sweep's metric (raypose.tune): the best so far with a head, the baseline before one
        metrics["best_val_mpjpe"] = best_val if best_val < float("inf") else baseline
        save = (is_best or epochs_done % cfg.storage.checkpoint_every == 0
                or epochs_done == cfg.schedule.epochs or epochs_done == stop_after)
        state = {"epoch": epochs_done, "stage": stage, "metrics": metrics,
                 "best_val_mpjpe_with_head": best_val if best_val < float("inf") else None,
                 "heads": {"regression": model.regression is not None,
                           "detection": model.detection is not None}}
        if rank == 0:
            print(f"[raypose] epoch {epochs_done}/{cfg.schedule.epochs} {stage}: "
                  f"loss {metrics['train_loss']:.4f}  val_mpjpe {metrics['val_mpjpe']:.1f} mm "
                  f"(mean pose {baseline:.1f})  {metrics['samples_per_s']:.1f} samples/s", flush=True)
        if rank == 0 and save:
            # written here, uploaded by Ray in a background thread while the next epoch trains;
            # Ray deletes the local folder once it is uploaded
            tmp = tempfile.mkdtemp(prefix="raypose-checkpoint-")
            checkpoint.save(tmp, model.state_dict(), optimizer.state_dict(), cfg.to_dict(), state)
            # Ray: one report per epoch; rank 0 carries the checkpoint
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(epochs_done),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             checkpoint_upload_fn=upload)
        else:
            ray.train.report(metrics, checkpoint=None)  # Ray: every rank reports (a barrier)
        if stop_after and epochs_done >= stop_after and epochs_done < cfg.schedule.epochs:
            if rank == 0:
                print(f"[raypose] stopping after epoch {epochs_done} as asked; the same --name "
                      "resumes", flush=True)
            return


def _upload_manifest_last(storage_context):
    """A checkpoint_upload_fn for ray.train.report: copies the payload files into the run's
    storage first and manifest.json last, so that a checkpoint with a manifest is complete.

    An object store that goes away during the upload (a restart, a dropped link) is retried by
    the storage filesystem itself (raypose.storage_retry: every file again from its start, with
    growing pauses, for up to RAYPOSE_UPLOAD_RETRY_S seconds, 300 by default) while training
    goes on; only then does the upload fail, and Ray Train restarts the workers from the latest
    complete checkpoint (storage.max_failures). Until manifest.json is written last, the folder
    is not a checkpoint to raypose or to Ray Train's record."""

    def upload(local, dir_name: str):
        import pyarrow.fs
        import ray.train

        fs = storage_context.storage_filesystem
        target = storage_context.build_checkpoint_path_from_name(dir_name)
        fs.create_dir(target)
        for name in (*checkpoint.PAYLOAD_FILES, checkpoint.MANIFEST_FILE):
            pyarrow.fs.copy_files(os.path.join(local.path, name), posixpath.join(target, name),
                                  source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        return ray.train.Checkpoint(path=target, filesystem=fs)

    return upload


# ----------------------------------------------------------------------------------------------
# Runs on the driver


def build_trainer(cfg: Config, run_name: str, loc: storage.Location, callbacks=(),
                  stop_after_epoch: int = 0, created_at: float | None = None,
                  data: dict | None = None):
    """The TorchTrainer for one run (also used by each Tune trial).

    created_at: time.time() when the caller started the run (default: now); workers report
    startup_seconds, the wall time from it to their first training step. data: prepare_data's
    result when the caller has it already (a sweep computes it once on its driver)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage.ray_storage(loc)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpu:
        resources["GPU"] = 1
    workers = cfg.worker_range()
    return TorchTrainer(  # Ray: the data-parallel run
        train_func_per_worker,
        train_loop_config={"config": cfg.to_dict(), "stop_after_epoch": stop_after_epoch,
                           "data": prepare_data(cfg) if data is None else data,
                           "trainer_created_at": time.time() if created_at is None else created_at},
        scaling_config=ScalingConfig(  # Ray: elastic when min_workers is set
            num_workers=workers if workers[0] != workers[1] else workers[1],
            use_gpu=cfg.scaling.gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.storage.max_failures),
            # keep the best K by checkpoint_score (val_mpjpe with a regression head, see
            # NO_REGRESSION_HEAD_SCORE); Ray Train always keeps the latest as well, for resume
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.keep_checkpoints,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="min"),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
    )


def run_training(cfg: Config, stop_after_epoch: int = 0, address: str | None = None):
    """Checks, then the TorchTrainer; returns Ray's Result."""
    loc = preflight(cfg)
    init_ray(address, command="train")
    check_resources(cfg, "--workers and --gpu" if cfg.scaling.gpu else "--workers")
    nodes.check_nodes(cfg, loc)  # every node that can host a worker sees the data and the storage
    trainer = build_trainer(cfg, cfg.storage.name, loc, stop_after_epoch=stop_after_epoch)
    start = time.perf_counter()
    with console.quiet():
        result = trainer.fit()
    metrics = result.metrics or {}
    print(f"[raypose] run {cfg.storage.name}: {metrics.get('epoch', '?')} epochs, "
          f"val_mpjpe {metrics.get('val_mpjpe', float('nan')):.1f} mm "
          f"(mean pose {metrics.get('val_mean_pose_mpjpe', float('nan')):.1f} mm), "
          f"{time.perf_counter() - start:.0f} s; checkpoints under {loc.join(cfg.storage.name).uri}")
    return result


# ----------------------------------------------------------------------------------------------
# Command line: raypose train / jobs/train.py


def add_arguments(parser) -> None:
    parser.add_argument("--data", help="directory with train.h5 (and test.h5), or s3://bucket/prefix "
                        "holding them and their manifest.json")
    parser.add_argument("--storage", help="experiment storage: a path, file://... or s3://bucket/prefix")
    parser.add_argument("--name", help="run name under --storage; the same name resumes")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", help="Ray Train workers (data-parallel): N, or MIN:MAX for an "
                        "elastic group that shrinks when nodes are lost and grows back")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--schedule", choices=["joint", "pretrain"])
    parser.add_argument("--config", help="YAML file with config overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set lrn_alpha=0.001 (repeatable)")
    parser.add_argument("--stop-after-epoch", type=int, default=0, metavar="N",
                        help="stop this invocation after epoch N; the same --name resumes later")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local instance)")


FLAG_KEYS = (("data", "data.path"), ("storage", "storage.uri"), ("name", "storage.name"),
             ("epochs", "schedule.epochs"), ("gpu", "scaling.gpu"), ("schedule", "schedule.kind"))


def config_from_args(args) -> Config:
    """The run's config from --config, --set and the flags; every error names what the user typed
    (the flag, `--set KEY=VALUE` or the config file)."""
    from raypose.config import set_value

    if args.name is not None:
        inputs.check_name(args.name, "--name")
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
    inputs.data_location(cfg.data.path, sources.get("data.path", "data.path"))
    inputs.storage_location(cfg.storage.uri, sources.get("storage.uri", "storage.uri"))
    return cfg


def run(args) -> int:
    # raypose's errors (config, data, storage, checkpoint) reach raypose.cli.main, which prints
    # them as one line and exits 2
    cfg = config_from_args(args)
    inputs.ray_address_from(args.address)  # before any data is read or storage made
    # a failed run raises from TorchTrainer.fit (Train V2), so reaching here means it finished
    run_training(cfg, stop_after_epoch=args.stop_after_epoch, address=args.address)
    return 0
