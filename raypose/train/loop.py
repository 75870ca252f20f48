"""The per-process training step, shared by the Ray Train workers, the plain PyTorch benchmark
and the learnability test.  No Ray here: every function takes the rank and world size it needs."""

import functools
import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from raypose.config import Config
from raypose.data.dataset import (
    PoseDataset,
    batch_chunks,
    device_batches,
    has_validation,
    iterate_batches,
    shard_positions,
)
from raypose.data.resident import ResidentSplit, iterate_resident
from raypose.data.skeleton import OFFSET_SCALE_MM, from_parent_relative
from raypose.model.losses import multitask_loss
from raypose.model.network import LiChanNet


def stage_for_epoch(cfg: Config, epoch: int) -> str:
    """'joint', or for the pretrain schedule 'detection' then 'regression'.  epoch is 0-based."""
    if cfg.schedule.kind == "joint":
        return "joint"
    return "detection" if epoch < cfg.pretrain_epochs() else "regression"


def regression_epochs_done(cfg: Config, epochs_done: int) -> int:
    """How many epochs the current regression head has trained (ASHA's time axis)."""
    return max(0, epochs_done - cfg.pretrain_epochs())


def stage_epochs(cfg: Config, stage: str) -> tuple:
    """(first epoch, number of epochs) of a stage: the whole run for 'joint', the detection
    stage's epochs and then the regression stage's for the pretrain schedule."""
    pretrain = cfg.pretrain_epochs()
    if stage == "detection":
        return 0, pretrain
    if stage == "regression":
        return pretrain, cfg.schedule.epochs - pretrain
    return 0, cfg.schedule.epochs


def lr_factor(cfg: Config, stage: str, epoch: int, fraction: float = 0.0) -> float:
    """The share of cfg.optim.lr to train with at `fraction` (0 to 1) of the way through epoch
    `epoch` (0-based) of `stage`: 1 for a constant schedule; for cosine, a half cosine from 1 at
    the stage's start to 0 at its end. A function of the epoch and the step alone (no state), so
    a resumed run and an elastic group that changed size continue on the same curve."""
    if cfg.optim.lr_schedule == "constant":
        return 1.0
    first, count = stage_epochs(cfg, stage)
    t = min(max((epoch - first + fraction) / max(count, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def steps_in_epoch(dataset_len: int, cfg: Config, world_size: int = 1) -> int:
    """The steps each rank takes in one training epoch: epoch_batches' shard (drop_last), cut into
    whole batches. Every epoch and rank has the same count; its shard's length is taken from
    shard_positions itself, unshuffled, so the two cannot disagree on the rule."""
    shard = shard_positions(
        dataset_len,
        False,
        0,
        0,
        0,
        world_size,
        drop_last=True,
        epoch_samples=cfg.data.epoch_samples,
    )
    return len(shard) // cfg.data.batch_size


def build_model(cfg: Config, stage: str) -> LiChanNet:
    if stage == "joint":
        return LiChanNet(cfg.model, regression=True, detection=True)
    if stage == "detection":
        return LiChanNet(cfg.model, regression=False, detection=True)
    if stage == "regression":
        return LiChanNet(cfg.model, regression=True, detection=False)
    raise ValueError(f"unknown stage {stage!r}")


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.name == "adam":
        # fused: one kernel over all 21 M parameters instead of a loop over the parameter tensors
        # (measured: docs/benchmarks/2026-12-05-earlier-cpu-speed.md)
        return torch.optim.Adam(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True
        )
    return torch.optim.SGD(
        params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )


@functools.lru_cache(maxsize=4)
def cpu_has_bf16_instructions(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (the avx512_bf16 or amx_bf16 flag of Linux's
    /proc/cpuinfo). Without them oneDNN emulates bf16, which is slower than float32."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def amp_active(device: torch.device, enabled: bool) -> bool:
    """Whether training steps run under bf16 autocast (cfg.scaling.amp): on GPUs with bf16, and on
    CPUs with bf16 instructions (speed and accuracy measured against float32:
    docs/benchmarks/2026-12-05-earlier-cpu-speed.md)."""
    if not enabled:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_instructions()


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast where amp_active; the weights, the optimiser and the losses stay float32."""
    if amp_active(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def maybe_compile(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """torch.compile(model) when cfg.scaling.compile; the module that trains, while the uncompiled
    one keeps the parameters (state_dict, checkpoints)."""
    return torch.compile(model) if cfg.scaling.compile else model


class NonFiniteLossError(RuntimeError):
    """A training step's loss was NaN or inf: the run stops instead of training on NaN weights."""


# How often a step loop on an accelerator reads whether a loss was non-finite: each read waits
# for the device, so it comes once per this many steps (and with the epoch's sums at its end);
# the step it names is exact all the same, recorded on the device without a wait.
NONFINITE_CHECK_STEPS = 50


def nonfinite_loss_error(
    cfg: Config, step: int, epoch: int | None = None, epoch_steps: int = 0, where: str = ""
) -> NonFiniteLossError:
    """The error for a NaN or inf loss at `step` (0-based) of `epoch` (0-based; None when the
    caller has no epochs, as the benchmarks)."""
    when = f"step {step + 1}" + (f" of {epoch_steps}" if epoch_steps else "")
    if epoch is not None:
        when = f"epoch {epoch + 1} of {cfg.schedule.epochs}, {when}"
    return NonFiniteLossError(
        f"the training loss became NaN or inf at {when}{where}; the run stops. Likely causes: "
        f"a learning rate too high for this model (optim.lr {cfg.optim.lr:g}), NaN or inf in "
        "the data's colour statistics (train.h5's rgb_eigval/rgb_eigvec attributes, which the "
        "PCA colour noise adds to every pixel), or a checkpoint with NaN weights that the run "
        "resumed from"
    )


def train_epoch(
    model,
    optimizer,
    batches,
    cfg: Config,
    stage: str,
    device: torch.device,
    max_steps: int = 0,
    world_size: int = 1,
    epoch: int | None = None,
    epoch_steps: int = 0,
    check_every: int = 0,
) -> dict:
    """One pass over `batches` (training tensors already on device); returns the mean loss parts
    over all ranks, the samples this rank saw and the seconds spent.

    With `epoch` (0-based) and `epoch_steps` (the steps this epoch takes, steps_in_epoch), the learning
    rate follows cfg.optim.lr_schedule, set before every step (lr_factor); without them it stays
    as the optimiser has it (the benchmarks).

    The step loop does not wait for the device at every step: loss sums stay on it and are read
    (and, with a process group of world_size > 1, all-reduced) once, after the last step.

    A NaN or inf loss raises NonFiniteLossError naming the epoch and the step. The first such
    step is recorded on the device at every step; the record is read every `check_every` steps
    (0: every step on the CPU, where a read waits for nothing, else NONFINITE_CHECK_STEPS) and
    after the last step, so an accelerator runs at most check_every - 1 steps past it."""
    model.train()
    scheduled = epoch is not None and epoch_steps > 0 and cfg.optim.lr_schedule != "constant"
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, regression, detection
    zero = torch.zeros((), device=device)
    # the 0-based index of the first step with a non-finite loss; inf while there is none
    first_bad = torch.full((), math.inf, dtype=torch.float64, device=device)
    check_every = check_every or (1 if device.type == "cpu" else NONFINITE_CHECK_STEPS)
    steps = samples = 0
    start = time.perf_counter()
    for batch in batches:
        if scheduled:
            lr = cfg.optim.lr * lr_factor(cfg, stage, epoch, min(steps / epoch_steps, 1.0))
            for group in optimizer.param_groups:
                group["lr"] = lr
        with autocast_for(device, cfg.scaling.amp):
            outputs = model(batch["image"])
        loss, parts = multitask_loss(outputs, batch, cfg.loss.detection_weight, stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack(
            [
                loss.detach(),
                zero if parts["regression"] is None else parts["regression"],
                zero if parts["detection"] is None else parts["detection"],
            ]
        )
        # device ops only: a where on the device, the step index as a scalar argument
        first_bad = torch.where(
            torch.isfinite(loss.detach()), first_bad, first_bad.clamp(max=steps)
        )
        steps += 1
        samples += len(batch["image"])
        if steps % check_every == 0:
            bad = first_bad.item()
            if math.isfinite(bad):
                raise nonfinite_loss_error(cfg, int(bad), epoch, epoch_steps)
        if max_steps and steps >= max_steps:
            break
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)  # every rank takes the same number of steps
    # the one wait for the device at the epoch's end: the sums and the steps since the last check
    *totals, bad = torch.cat([sums, first_bad.view(1)]).tolist()
    if math.isfinite(bad):
        raise nonfinite_loss_error(cfg, int(bad), epoch, epoch_steps)
    if steps and not math.isfinite(totals[0]):
        # another rank's loss, in the all-reduced sums
        raise nonfinite_loss_error(
            cfg,
            steps - 1,
            epoch,
            epoch_steps,
            where=" (on another worker, by this step at the latest)",
        )
    seconds = time.perf_counter() - start
    means = {
        f"train_{k}": (v / (steps * world_size) if steps else float("nan"))
        for k, v in zip(("loss", "regression", "detection"), totals)
    }
    if stage == "detection":
        means.pop("train_regression")
    if stage == "regression":
        means.pop("train_detection")
    return {**means, "samples": samples, "seconds": seconds, "steps": steps}


@torch.no_grad()
def predict(
    model,
    dataset: PoseDataset,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Root-relative predictions (mm) for this rank's share of the dataset (no augmentation).

    Rank r takes the r-th of world_size contiguous slices (every sample once overall, read as
    contiguous runs). Returns numpy arrays: positions (which samples), pred_3d and gt_3d [n, 17, 3]
    in mm, actions (indices into dataset.action_names), and detection logits and targets
    [n, 17, 100] when the model has a detection head."""
    model.eval()
    positions = np.array_split(np.arange(len(dataset)), world_size)[rank]
    parts = {
        k: [] for k in ("gt_3d", "actions", "pred_3d", "detection_logits", "detection_targets")
    }
    for batch in device_batches(
        dataset, batch_chunks(positions, batch_size), device=device, channels_last=channels_last
    ):
        outputs = model(batch["image"])
        parts["gt_3d"].append(batch["joints_3d"])
        parts["actions"].append(batch["action"])
        if "offsets" in outputs:
            offsets = outputs["offsets"].float() * OFFSET_SCALE_MM  # (B, 17, 3) mm
            parts["pred_3d"].append(from_parent_relative(offsets))
        if "detection_logits" in outputs:
            parts["detection_logits"].append(outputs["detection_logits"].float())
            parts["detection_targets"].append(batch["detection"])
    out = {k: torch.cat(v).cpu().numpy() if v else None for k, v in parts.items()}  # one copy
    return {"positions": positions, **out}


def validate(
    model,
    dataset: PoseDataset,
    batch_size: int,
    device: torch.device,
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Validation metrics, reduced across workers when a process group is up (every rank gets the
    same numbers): val_mpjpe (mm) if the model has a regression head, and val_detection_loss /
    val_detection_accuracy if it has a detection head."""
    out = predict(model, dataset, batch_size, device, cfg.scaling.channels_last, rank, world_size)
    # sums: [mpjpe sum, poses, detection bce sum, detection correct, detection cells]
    sums = torch.zeros(5, dtype=torch.float64)
    if out["pred_3d"] is not None:
        err = np.linalg.norm(out["pred_3d"] - out["gt_3d"], axis=-1).mean(axis=-1)  # (n,)
        sums[0], sums[1] = float(err.sum()), len(err)
    if out["detection_logits"] is not None:
        logits = torch.from_numpy(out["detection_logits"])
        target = torch.from_numpy(out["detection_targets"])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        sums[2] = float(bce.sum(dim=(1, 2)).sum())
        sums[3] = float(((logits > 0).float() == target).float().sum())
        sums[4] = float(target.numel())
        sums[1] = max(float(sums[1]), float(len(logits)))
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    metrics = {}
    if out["pred_3d"] is not None:
        metrics["val_mpjpe"] = float(sums[0] / max(float(sums[1]), 1.0))
    if out["detection_logits"] is not None:
        metrics["val_detection_loss"] = float(sums[2] / max(float(sums[1]), 1.0))
        metrics["val_detection_accuracy"] = float(sums[3] / max(float(sums[4]), 1.0))
    return metrics


def open_splits(cfg: Config, seed: int | None = None, info: dict | None = None):
    """(train, validation) datasets from train.h5: validation holds out cfg.data.val_subjects and
    every cfg.data.val_sequence_every-th sequence of the others (raypose.data.dataset.
    validation_rows); it is None when neither holds anything out (training on every subject, as
    the paper's protocol does). cfg.data.actions ([] = all) narrows both sides. The test split is
    never touched here. info: train.h5's validate_file summary when the caller has validated it
    (None validates it here)."""
    from raypose.data.cache import local_data_dir

    # a local folder as it is; for s3://... this node's verified copy (fetched once per node)
    path = str(local_data_dir(cfg.data.path, ("train.h5",)) / "train.h5")
    seed = cfg.seed if seed is None else seed
    split = {
        "val_subjects": cfg.data.val_subjects,
        "val_sequence_every": cfg.data.val_sequence_every,
        "actions": cfg.data.actions or None,
    }
    train = PoseDataset(
        path,
        split="train",
        augment=cfg.data.augment,
        color_noise=cfg.data.color_noise,
        flip=cfg.data.flip,
        max_samples=cfg.data.max_train_samples,
        seed=seed,
        info=info,
        **split,
    )
    if not has_validation(cfg.data.val_subjects, cfg.data.val_sequence_every):
        return train, None
    val = PoseDataset(
        path,
        split="validation",
        augment=False,
        max_samples=cfg.data.max_val_samples,
        seed=seed,
        info=info or train.info,
        **split,
    )
    return train, val


def epoch_batches(
    dataset,
    cfg: Config,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resident: ResidentSplit | None = None,
    readers: int = 1,
):
    """This rank's training batches of one epoch, on device: from the resident split when there
    is one (raypose.data.resident, the same batches), else read ahead by `readers` host threads."""
    order = {
        "shuffle": True,
        "seed": cfg.seed,
        "epoch": epoch,
        "rank": rank,
        "world_size": world_size,
        "drop_last": True,
        "channels_last": cfg.scaling.channels_last,
        "epoch_samples": cfg.data.epoch_samples,
    }
    if resident is not None:
        return iterate_resident(resident, cfg.data.batch_size, **order)
    return iterate_batches(dataset, cfg.data.batch_size, device=device, readers=readers, **order)
