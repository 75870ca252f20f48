"""What each Ray Train worker runs: the epochs of one run, its reports and checkpoints.

Imported only inside the worker processes (raypose.train.run.train_func_per_worker), because it imports
torch; the per-step work is raypose.train.loop, which has no Ray in it. Where Ray plugs in is marked
`# Ray:`.
"""

import os
import time

import torch

from raypose.config import ConfigError, config_from_dict
from raypose.console import worker_say
from raypose.data.resident import ResidentSplit
from raypose.model.network import regression_from_pretrained
from raypose.storage import checkpoint
from raypose.storage import retry as storage_retry
from raypose.train import packing
from raypose.train.loop import (
    build_model,
    build_optimizer,
    epoch_batches,
    maybe_compile,
    open_splits,
    regression_epochs_done,
    stage_for_epoch,
    steps_in_epoch,
    train_epoch,
    validate,
)

CHECKPOINT_PREFIX = "epoch_"
# Checkpoints are ranked by `checkpoint_score` (lower is better): val_mpjpe once a regression head
# exists; before that (the detection stage of a pretrain run) val_mpjpe is only the mean-pose
# baseline, so those checkpoints score this instead and are the first that retention drops.
NO_REGRESSION_HEAD_SCORE = 1.0e9


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def _wrap_ddp(model, device, world_size):
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_loop(loop_config: dict) -> None:
    import ray  # Ray: worker-side API
    import ray.train
    import ray.train.torch

    # the driver's storage endpoint, for raypose's own storage calls here
    os.environ.update(loop_config.get("storage_env") or {})
    lines = loop_config.get("lines")  # rank 0's lines to the driver's terminal (console.LineRelay)
    cfg = config_from_dict(loop_config["config"])
    stop_after = loop_config.get("stop_after_epoch", 0)
    data = loop_config["data"]  # validated on the driver: the file's summary and the baseline
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # a GPU (or a share) that Ray assigned on a node where torch sees no CUDA: the CPU, said once
    device, fallback = packing.training_device(ray.train.torch.get_device(), cfg.scaling.gpu)
    if fallback and rank == 0:
        worker_say(lines, fallback)
    if device.type == "cpu":
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    folders, size = checkpoint.remove_orphaned_spool_dirs()
    if folders:
        print(
            f"[raypose] removed {folders} checkpoint folder(s) ({size / 1e6:.0f} MB) from "
            f"{checkpoint.spool_dir()}: workers that ended before their upload left them",
            flush=True,
        )  # on this node's worker log: every rank may find some
    train_set, val_set = open_splits(cfg, info=data["info"])
    keep_resident, why = packing.resident_decision(cfg, len(train_set), device)
    # the training split on the device (the same batches as the host feed), else the host feed
    resident = ResidentSplit(train_set, device) if keep_resident else None
    readers = packing.reader_threads(cfg, device)
    if rank == 0 and (resident is not None or device.type == "cuda"):
        feed = "resident" if resident is not None else f"host feed, {readers} reader thread(s)"
        worker_say(lines, f"[raypose] training data: {feed} ({why})")
    epoch_steps = steps_in_epoch(len(train_set), cfg, world_size)  # the same for every epoch
    if epoch_steps == 0:
        # the driver's preflight refuses this for the run's config; a sweep trial's own batch
        # size can still get here, and an epoch without a step would report a NaN loss
        samples = cfg.data.epoch_samples or len(train_set)
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} per worker with {world_size} "
            f"worker(s) needs {cfg.data.batch_size * world_size} samples per "
            f"epoch, but an epoch has {samples}, so it would take no training "
            "step; lower data.batch_size",
            key="data.batch_size",
        )
    # a model without a regression head predicts nothing better than the mean pose: its
    # val_mpjpe is reported as this baseline (and ASHA ignores those epochs, see raypose.search.sweep)
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
            worker_say(
                lines,
                f"[raypose] resumed from epoch {start_epoch} ({loaded['state']['stage']} stage)",
            )
    else:
        model = build_model(cfg, stage_for_epoch(cfg, 0)).to(device)
        optimizer = build_optimizer(cfg, model)
    if cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = maybe_compile(_wrap_ddp(model, device, world_size), cfg)
    startup_seconds = None
    upload = _upload_manifest_last(loop_config["run_uri"])

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
        batches = epoch_batches(
            train_set, cfg, epoch, rank, world_size, device, resident=resident, readers=readers
        )
        if startup_seconds is None:
            # wall clock from the trainer's creation (on the driver) to the first step
            startup_seconds = time.time() - loop_config["trainer_created_at"]
        epoch_start = time.perf_counter()
        stats = train_epoch(
            train_model,
            optimizer,
            batches,
            cfg,
            stage,
            device,
            world_size=world_size,
            epoch=epoch,
            epoch_steps=epoch_steps,
        )
        val = (
            {}  # nothing held out: the paper's protocol, a fixed epoch budget and the last epoch
            if val_set is None
            else validate(model, val_set, cfg.data.batch_size, device, cfg, rank, world_size)
        )
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
            # wall clock when this rank finished the epoch: the controller sees a report only
            # after the checkpoint upload, which can end seconds later
            "epoch_ended_at": time.time(),
            "stage": stage,
            "regression_epochs": regression_epochs_done(cfg, epochs_done),
            "has_regression_head": model.regression is not None,
            **{k: v for k, v in stats.items() if k.startswith("train_")},
            "samples_per_s": world_size * stats["samples"] / max(stats["seconds"], 1e-9),
            # where this rank trained ("cpu" also for a GPU share on a node without CUDA) and the
            # most its tensors have held on its GPU since it started (CUDA only)
            "device": device.type,
            **gpu_memory_peak(device),
            "val_mean_pose_mpjpe": baseline,
            "startup_seconds": startup_seconds,
            **val,
            "checkpoint_score": checkpoint_score(val, model.regression is not None, epoch + 1),
        }
        if val_set is not None:
            metrics.setdefault("val_mpjpe", baseline)
        # every rank computes the same decision from all-reduced metrics; only epochs with a
        # regression head count (a detection stage's val_mpjpe is the mean-pose baseline)
        is_best = (
            val_set is not None and model.regression is not None and metrics["val_mpjpe"] < best_val
        )
        if is_best:
            best_val = metrics["val_mpjpe"]
        if val_set is not None:
            # the sweep's metric (raypose.search.sweep): the best so far with a head, the
            # baseline before one
            metrics["best_val_mpjpe"] = best_val if best_val < float("inf") else baseline
        save = (
            is_best
            or epochs_done % cfg.storage.checkpoint_every == 0
            or epochs_done == cfg.schedule.epochs
            or epochs_done == stop_after
        )
        state = {
            "epoch": epochs_done,
            "stage": stage,
            "metrics": metrics,
            "best_val_mpjpe_with_head": best_val if best_val < float("inf") else None,
            "heads": {
                "regression": model.regression is not None,
                "detection": model.detection is not None,
            },
        }
        if rank == 0:
            worker_say(
                lines,
                f"[raypose] epoch {epochs_done}/{cfg.schedule.epochs} {stage}: "
                f"loss {metrics['train_loss']:.4f}  {validation_text(metrics, baseline)}"
                f"{metrics['samples_per_s']:.1f} samples/s{gpu_memory_text(metrics)}",
            )
        if rank == 0 and save:
            # written here, uploaded by Ray in a background thread while the next epoch trains;
            # Ray deletes the local folder once it is uploaded (see checkpoint.SPOOL_DIR_NAME)
            tmp = checkpoint.new_spool_dir()
            checkpoint.save(tmp, model.state_dict(), optimizer.state_dict(), cfg.to_dict(), state)
            # Ray: one report per epoch; rank 0 carries the checkpoint
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_name(epochs_done),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                checkpoint_upload_fn=upload,
            )
        else:
            ray.train.report(metrics, checkpoint=None)  # Ray: every rank reports (a barrier)
        if stop_after and epochs_done >= stop_after and epochs_done < cfg.schedule.epochs:
            if rank == 0:
                worker_say(
                    lines,
                    f"[raypose] stopping after epoch {epochs_done} as asked; the "
                    "same --name resumes",
                )
            return


def gpu_memory_peak(device) -> dict:
    """{"gpu_memory_peak_bytes": torch.cuda.max_memory_allocated} on CUDA; {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_peak_bytes": torch.cuda.max_memory_allocated(device)}


def gpu_memory_text(metrics: dict) -> str:
    """The epoch line's peak GPU memory ('' off the GPU)."""
    peak = metrics.get("gpu_memory_peak_bytes")
    return "" if peak is None else f"  peak GPU memory {peak / 1e9:.2f} GB"


def checkpoint_score(val: dict, has_regression_head: bool, epochs_done: int) -> float:
    """Ray Train keeps the checkpoints with the lowest score: val_mpjpe once a regression head
    exists; without validation the newest (the last checkpoint is the one evaluated)."""
    if not has_regression_head:
        return NO_REGRESSION_HEAD_SCORE
    return val["val_mpjpe"] if "val_mpjpe" in val else -float(epochs_done)


def validation_text(metrics: dict, baseline) -> str:
    """The epoch line's validation part ('' when the run holds nothing out)."""
    if "val_mpjpe" not in metrics:
        return ""
    return f"val_mpjpe {metrics['val_mpjpe']:.1f} mm (mean pose {baseline:.1f})  "


def _upload_manifest_last(run_uri: str):
    """A checkpoint_upload_fn for ray.train.report: puts the payload files into the run's
    folder (run_uri: <storage>/<run name>, where Ray Train keeps the run) first and
    manifest.json last, so that a checkpoint with a manifest is complete (checkpoint.upload:
    hard links on local storage on the spool's device, copies elsewhere).

    An object store that goes away during the upload (a restart, a dropped link) is retried by
    the storage filesystem itself (raypose.storage.retry: every file again from its start, with
    growing pauses, for up to RAYPOSE_UPLOAD_RETRY_S seconds, 300 by default) while training
    goes on; only then does the upload fail, and Ray Train restarts the workers from the latest
    complete checkpoint (storage.max_failures). Until manifest.json is written last, the folder
    is not a checkpoint to raypose or to Ray Train's record."""
    import pyarrow.fs

    from raypose import storage

    run = storage.parse(run_uri)

    def upload(local, dir_name: str):
        import ray.train

        path, fs = storage_retry.ray_storage(run.join(dir_name))
        fs = fs or pyarrow.fs.LocalFileSystem()
        checkpoint.upload(local.path, path, fs)  # hard links on local storage, else copies
        return ray.train.Checkpoint(path=path, filesystem=fs)

    return upload
