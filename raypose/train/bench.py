"""`raypose bench train`: where the time of a training step goes, on CPU or on a GPU.

Measured in one run, taking turns, `--repeats` times; the medians are compared:
  host feed        one host thread reading uint8 crops and poses (contiguous HDF5 reads) and,
                   on CUDA, putting them in pinned memory: samples/s per CPU core
  device augment   crop, flip, colour noise, normalisation and both targets on the device
  plain loop       raypose.train.loop.train_epoch without Ray: model, batch and data as in training
                   (channels_last; bf16 autocast on GPUs with bf16 and on CPUs with bf16
                   instructions), reading ahead in a background thread
  plain, compiled  the same with torch.compile (--compile)
  Ray Train loop   the same train_epoch inside a Ray Train worker (1 worker)

Each loop measurement runs `warmup` steps, then times `steps` training steps, ending with the one
wait for the device that train_epoch has; the Ray figure is timed inside the worker, so it shows
the cost of running the step in a Ray Train worker, and Ray's start-up per run is reported apart.
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from raypose.config import Config, apply_overrides, config_from_dict
from raypose.data.dataset import (
    augment_batch,
    batch_chunks,
    host_batches,
    iterate_batches,
    shard_positions,
    to_device,
)
from raypose.train.loop import (
    amp_active,
    build_model,
    build_optimizer,
    maybe_compile,
    open_splits,
    train_epoch,
)


def pick_device(name: str) -> torch.device:
    from raypose import validate

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise validate.InputError(
            "--device cuda: torch sees no CUDA device here (try --device cpu)"
        )
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunks_forever(dataset, batch_size: int, seed: int):
    epoch = 0
    while True:
        shard = shard_positions(len(dataset), True, seed, epoch, drop_last=True)
        for chunk in batch_chunks(shard, batch_size, drop_last=True):
            yield epoch, chunk
        epoch += 1


def host_feed_samples_per_s(cfg: Config, device: torch.device, batches: int) -> float:
    """One thread: HDF5 reads in windows, gathers, draws and (CUDA) pinning; samples per second of
    that thread's CPU time, so per CPU core whatever else the machine runs."""
    train_set, _ = open_splits(cfg)
    epochs = {}
    for epoch, chunk in _chunks_forever(train_set, cfg.data.batch_size, cfg.seed):
        epochs.setdefault(epoch, []).append(chunk)
        if sum(len(c) for c in epochs.values()) == batches:
            break
    list(host_batches(train_set, epochs[0][:2], 0))  # opens the file, caches the poses
    samples = 0
    start = time.thread_time()
    for epoch, chunks in epochs.items():
        for raw in host_batches(train_set, chunks, epoch, pin_memory=device.type == "cuda"):
            samples += len(raw["images"])
    return samples / (time.thread_time() - start)


def device_augment_samples_per_s(cfg: Config, device: torch.device, batches: int) -> float:
    """augment_batch on batches already on the device; per second of wall time on CUDA, of this
    process's CPU time on CPU (where torch's threads share the cores)."""
    train_set, _ = open_splits(cfg)
    shard = shard_positions(len(train_set), True, cfg.seed, 0, drop_last=True)
    chunks = batch_chunks(shard, cfg.data.batch_size, drop_last=True)[:8]
    raws = [
        to_device(raw, device) for raw in host_batches(train_set, chunks, 0, device.type == "cuda")
    ]
    augment_batch(raws[0], train_set.augmentation, cfg.scaling.channels_last)  # warm-up
    _sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for k in range(batches):
        augment_batch(raws[k % len(raws)], train_set.augmentation, cfg.scaling.channels_last)
    _sync(device)
    return batches * cfg.data.batch_size / (clock() - start)


def loop_samples_per_s(
    cfg: Config, device: torch.device, steps: int, warmup: int, threads: int
) -> float:
    """raypose.train.loop.train_epoch on the joint model, `steps` timed steps after `warmup`."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    train_set, _ = open_splits(cfg)
    model = build_model(cfg, "joint").to(device)
    if cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    train_model = maybe_compile(model, cfg)

    def batches(epoch):
        while True:  # as many batches as asked for, whatever the dataset size
            yield from iterate_batches(
                train_set,
                cfg.data.batch_size,
                shuffle=True,
                seed=cfg.seed,
                epoch=epoch,
                drop_last=True,
                device=device,
                channels_last=cfg.scaling.channels_last,
            )
            epoch += 1

    train_epoch(train_model, optimizer, batches(0), cfg, "joint", device, max_steps=warmup)
    stats = train_epoch(train_model, optimizer, batches(1), cfg, "joint", device, max_steps=steps)
    return stats["samples"] / stats["seconds"]


def bench_func_per_worker(loop_config: dict) -> None:
    import ray.train  # Ray: worker side
    import ray.train.torch

    from raypose.config import config_from_dict

    cfg = config_from_dict(loop_config["config"])
    rate = loop_samples_per_s(
        cfg,
        ray.train.torch.get_device(),
        loop_config["steps"],
        loop_config["warmup"],
        loop_config["threads"],
    )
    # Train V2's Result.metrics are those of the latest checkpoint: report a tiny one
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(
            {"samples_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )


def ray_samples_per_s(
    cfg: Config, device: torch.device, steps: int, warmup: int, threads: int
) -> tuple:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(  # as raypose.train.run builds it
            bench_func_per_worker,
            torch_config=TorchConfig(),
            train_loop_config={
                "config": cfg.to_dict(),
                "steps": steps,
                "warmup": warmup,
                "threads": threads,
            },
            scaling_config=ScalingConfig(
                num_workers=1, use_gpu=device.type == "cuda", resources_per_worker={"CPU": threads}
            ),
            run_config=RunConfig(name="bench", storage_path=tmp),
        )
        start = time.perf_counter()
        result = trainer.fit()
        total = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    return result.metrics["samples_per_s"], total


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data", default="data/synth", help="data directory (made with synth if missing)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model trains (auto: cuda when torch sees a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=40, help="timed training steps per measurement"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also measure the plain loop with torch.compile"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train loop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _line(name: str, values: list, unit: str = "samples/s") -> str:
    per = ", ".join(f"{v:,.1f}" for v in values)
    return f"  {name:<28} {statistics.median(values):>12,.1f} {unit}   (per repeat: {per})"


def _ratio(name: str, a: list, b: list) -> str:
    ratios = [x / y for x, y in zip(a, b)]
    return (
        f"  {name:<40} median {statistics.median(ratios):.3f}   "
        f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


def run(args) -> int:
    import os

    from raypose import validate

    # every flag is checked before data is rendered or Ray started
    for flag, value in (
        ("--repeats", args.repeats),
        ("--steps", args.steps),
        ("--threads", args.threads),
    ):
        validate.positive(value, flag)
    if args.warmup < 0:
        raise validate.InputError(f"--warmup must be >= 0, got {args.warmup}")
    data = validate.output_dir(args.data, "--data")
    if not (data / "train.h5").exists() and (data / "test.h5").exists():
        # rendering a set would replace that test.h5
        raise validate.InputError(
            f"--data {args.data}: holds test.h5 but no train.h5; give a "
            "folder with both, or one without either for a rendered set"
        )
    if not args.no_ray:
        validate.ray_address_from(None)
    device = pick_device(args.device)
    threads = args.threads or os.cpu_count()
    cfg = Config()
    cfg.data.path = str(Path(args.data).resolve())  # Ray Train workers run in another folder
    cfg.data.batch_size = args.batch_size
    sources = {"data.batch_size": "--batch-size"}
    apply_overrides(cfg, args.overrides, sources=sources)
    cfg.validate(sources)
    if not (Path(args.data) / "train.h5").exists():
        from raypose.data.synth import synthesize

        print(f"[raypose] no data in {args.data}: rendering a small synthetic set", flush=True)
        # side colours per sample: their files are flipped, so the measured augmentation has every step
        synthesize(args.data, 1000, 100, seed=0, side_colours="per-sample")
    if not args.no_ray:
        from raypose.cluster.driver import init_ray

        init_ray(num_cpus=threads, command="bench")
    compiled = config_from_dict(cfg.to_dict())
    compiled.scaling.compile = True
    amp = amp_active(device, cfg.scaling.amp)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    )
    print(
        f"[raypose] bench on {device.type} ({name}): batch {args.batch_size}, {args.steps} timed "
        f"steps after {args.warmup} warm-up, {args.repeats} repeats (taking turns); "
        f"bf16 autocast {'on' if amp else 'off'}, channels_last {cfg.scaling.channels_last}",
        flush=True,
    )
    feed_batches = max(args.steps, 64)
    results = {
        "feed": [],
        "augment": [],
        "plain": [],
        "compiled": [],
        "ray": [],
        "ray_run_seconds": [],
    }
    for r in range(args.repeats):
        results["feed"].append(host_feed_samples_per_s(cfg, device, feed_batches))
        results["augment"].append(device_augment_samples_per_s(cfg, device, feed_batches))
        results["plain"].append(loop_samples_per_s(cfg, device, args.steps, args.warmup, threads))
        line = (
            f"  repeat {r + 1}: host feed {results['feed'][-1]:,.0f}  device augment "
            f"{results['augment'][-1]:,.0f}  plain loop {results['plain'][-1]:,.2f}"
        )
        if args.compile:
            results["compiled"].append(
                loop_samples_per_s(compiled, device, args.steps, max(args.warmup, 3), threads)
            )
            line += f"  compiled {results['compiled'][-1]:,.2f}"
        if not args.no_ray:
            ray_rate, ray_total = ray_samples_per_s(cfg, device, args.steps, args.warmup, threads)
            results["ray"].append(ray_rate)
            results["ray_run_seconds"].append(ray_total)
            line += f"  Ray Train loop {ray_rate:,.2f}  (Ray run incl. start-up {ray_total:.1f} s)"
        print(line + " samples/s", flush=True)
    print(f"medians of {args.repeats}:")
    print(_line("host feed, per CPU core", results["feed"]))
    print(_line(f"device augmentation ({device.type})", results["augment"]))
    print(_line("plain PyTorch loop", results["plain"]))
    if args.compile:
        print(_line("plain loop, torch.compile", results["compiled"]))
    if not args.no_ray:
        print(_line("Ray Train loop, 1 worker", results["ray"]))
        print(_line("Ray Train run incl. start-up", results["ray_run_seconds"], "s"))
    print("ratios (per repeat, then the median):")
    print(_ratio("host feed per core / plain loop", results["feed"], results["plain"]))
    print(_ratio("device augmentation / plain loop", results["augment"], results["plain"]))
    if args.compile:
        print(_ratio("compiled / plain loop", results["compiled"], results["plain"]))
    if not args.no_ray:
        print(_ratio("Ray Train loop / plain loop", results["ray"], results["plain"]))
        import ray

        ray.shutdown()
    return 0
