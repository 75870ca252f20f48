"""Several trials on one GPU: which device a worker trains on, whether its training split is
resident there, and whether k = 1 / scaling.gpu_share trials fit in one GPU's memory.

No Ray here: raypose.train.run runs `probe_training_step` as one Ray task on a GPU before any
trial starts, and `check_packing` refuses, in one line, a packing whose measured need exceeds the
GPU's memory. docs/training.md#fractional-gpus says how the estimate is made and why.
"""

import time

import torch

from raypose.config import Config, ConfigError, training_memory
from raypose.data.resident import resident_bytes
from raypose.train.loop import build_model, build_optimizer, train_epoch

# Memory a process's CUDA context takes on the GPU outside PyTorch's allocator (its kernels and
# libraries, cuBLAS and cuDNN workspaces): what torch.cuda.max_memory_reserved does not count.
CUDA_CONTEXT_BYTES = 1 << 29  # 0.5 GiB
# The share of a GPU's memory that the trials packed on it may plan to fill: the allocator's
# fragmentation and the other processes on the GPU (the driver's own) take the rest.
MEMORY_HEADROOM = 0.9
# Training steps of the probe: the first allocates the optimizer's state, the second is a step
# with everything in place, as every later step is.
PROBE_STEPS = 2


def training_device(assigned: torch.device, gpu: bool) -> tuple:
    """(device, note): the device a worker trains on. Ray assigns a GPU (or a share of one) to a
    worker of a GPU run; on a node where torch sees no CUDA device (a CPU build of torch, a
    declared GPU resource without a GPU) the worker trains on the CPU instead, and note says so
    in one line (None when there is nothing to say)."""
    if assigned.type != "cuda" or torch.cuda.is_available():
        return assigned, None
    note = (
        "[raypose] Ray assigned this worker a GPU"
        + (" share" if gpu else "")
        + " but torch sees no CUDA device here (torch "
        f"{torch.__version__}); training on the CPU"
    )
    return torch.device("cpu"), note


def gpu_memory_bytes(device: torch.device) -> int:
    """The total memory of a CUDA device."""
    return torch.cuda.get_device_properties(device).total_memory


def resident_decision(
    cfg: Config, samples: int, device: torch.device, gpu_memory: int | None = None
) -> tuple:
    """(resident, why): whether a worker keeps its training split of `samples` samples on its
    device (data.feed), and the reason, for the worker's one line.

    auto: on CUDA when the split (RESIDENT_SAMPLE_BYTES a sample) fits beside the training step
    in this worker's share of the GPU: split + training_memory(cfg) (the float32 estimate, above
    what bf16 steps take) + CUDA_CONTEXT_BYTES <= MEMORY_HEADROOM x gpu_share x the GPU's
    memory. The rule reads the config and the device alone, so every trial packed on one GPU
    decides the same way, whatever the others have allocated when it starts. Off on the CPU,
    where the host feed is not the limit. resident | host: as asked. gpu_memory: the GPU's memory in
    bytes (default: the device's own)."""
    size = resident_bytes(samples)
    gb = 1e9
    if cfg.data.feed == "host":
        return False, "data.feed host"
    if cfg.data.feed == "resident":
        return True, f"data.feed resident: {size / gb:.2f} GB on {device}"
    if device.type != "cuda":
        return False, f"data.feed auto: the host feed on {device.type}"
    share = cfg.scaling.gpu_share if cfg.scaling.gpu else 1.0
    memory = gpu_memory_bytes(device) if gpu_memory is None else gpu_memory
    budget = MEMORY_HEADROOM * share * memory
    step = training_memory(cfg)["total_bytes"] + CUDA_CONTEXT_BYTES
    if size + step <= budget:
        return True, (
            f"data.feed auto: {size / gb:.2f} GB on {device} (with the step's "
            f"{step / gb:.1f} GB, within {budget / gb:.1f} GB of its GPU share)"
        )
    return False, (
        f"data.feed auto: the split's {size / gb:.2f} GB and the step's {step / gb:.1f} GB "
        f"exceed {budget / gb:.1f} GB of this worker's GPU share; the host feed instead"
    )


def reader_threads(cfg: Config, device: torch.device) -> int:
    """Host reader threads (data.reader_threads; 0 = auto): two on CUDA, where one reader feeds
    about as fast as a fast step consumes (docs/benchmarks/2026-12-05-earlier-h200.md), one on
    the CPU, where the step is the limit and a second reader would take a core from it."""
    if cfg.data.reader_threads:
        return cfg.data.reader_threads
    return 2 if device.type == "cuda" else 1


def probe_batch(cfg: Config, device: torch.device) -> dict:
    """A training batch of data.batch_size with the shapes and dtypes of a real one (random
    values): the memory of a step depends on them alone."""
    b = cfg.data.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    image = torch.randn((b, 3, 112, 112), generator=generator).to(device)
    if cfg.scaling.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {
        "image": image,
        "offsets": (0.1 * torch.randn((b, 17, 3), generator=generator)).to(device),
        "detection": (torch.rand((b, 17, 100), generator=generator) < 0.05).float().to(device),
    }


def probe_training_step(config: dict) -> dict | None:
    """Runs on one GPU worker before the trials: PROBE_STEPS training steps of the run's largest
    model (both heads for joint training, the detection head for the pretrain schedule) at
    data.batch_size, as train_epoch takes them (channels_last, bf16 autocast, the optimizer).
    Returns the peak memory PyTorch's allocator reserved (peak_reserved_bytes) and allocated,
    the GPU's total memory and name; None where torch sees no CUDA device (the packing check is
    then skipped: the trials train on the CPU, training_device)."""
    from raypose.config import config_from_dict

    if not torch.cuda.is_available():
        return None
    cfg = config_from_dict(config)
    device = torch.device("cuda", torch.cuda.current_device())
    stage = "joint" if cfg.schedule.kind == "joint" else "detection"
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, stage).to(device)
    if cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    batch = probe_batch(cfg, device)
    torch.cuda.reset_peak_memory_stats(device)
    train_epoch(model, optimizer, [batch] * PROBE_STEPS, cfg, stage, device)
    torch.cuda.synchronize(device)
    figures = {
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "total_bytes": gpu_memory_bytes(device),
        "device_name": torch.cuda.get_device_name(device),
        "batch_size": cfg.data.batch_size,
        "seconds": time.perf_counter() - start,
    }
    del model, optimizer, batch
    torch.cuda.empty_cache()  # the probe's memory back to the GPU for the trials
    return figures


def trial_need_bytes(cfg: Config, probe: dict, samples: int) -> dict:
    """What one worker needs on the GPU: the probe's peak reserved memory, the CUDA context and,
    with data.feed resident, its training split (auto decides per worker within its share and
    falls back to the host feed, so it is not counted)."""
    data = resident_bytes(samples) if cfg.data.feed == "resident" else 0
    step = probe["peak_reserved_bytes"]
    return {
        "step": step,
        "context": CUDA_CONTEXT_BYTES,
        "data": data,
        "total": step + data + CUDA_CONTEXT_BYTES,
    }


def check_packing(cfg: Config, probe: dict | None, samples: int, flags: str) -> dict | None:
    """Refuses (ConfigError, one line naming flags) a GPU share whose k = 1 / gpu_share workers
    would need more than MEMORY_HEADROOM of the GPU's memory by the probe's measurement; returns
    the figures it compared (None without a GPU share below 1 or without a probe)."""
    if not cfg.scaling.gpu or cfg.scaling.gpu_share >= 1.0 or probe is None:
        return None
    k = round(1.0 / cfg.scaling.gpu_share)
    need = trial_need_bytes(cfg, probe, samples)
    allowed = MEMORY_HEADROOM * probe["total_bytes"]
    figures = {"trials_per_gpu": k, "need_bytes": need, "allowed_bytes": allowed, **probe}
    if k * need["total"] <= allowed:
        return figures
    gb = 1e9
    data = (
        f" + its resident split {need['data'] / gb:.2f} GB (data.feed resident)"
        if need["data"]
        else ""
    )
    raise ConfigError(
        f"{flags}: {k} trials on one GPU would need {k} x {need['total'] / gb:.2f} GB = "
        f"{k * need['total'] / gb:.1f} GB, more than {allowed / gb:.1f} GB "
        f"({MEMORY_HEADROOM:.0%}) of the {probe['device_name']}'s "
        f"{probe['total_bytes'] / gb:.1f} GB (one trial: a training step at data.batch_size "
        f"{probe['batch_size']} peaked at {need['step'] / gb:.2f} GB on that GPU, + "
        f"{need['context'] / gb:.1f} GB for its CUDA context{data}); give a larger share "
        "(fewer trials per GPU) or a smaller data.batch_size"
    )
