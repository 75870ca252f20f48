"""`raypose bench train`: samples/s of the Ray Train loop (1 worker), of a plain PyTorch loop of the
same model, batch and data (no Ray), and of the input pipeline alone (HDF5 read + augmentation +
targets).  The three are measured alternately in one run, repeated, and the medians compared.

Each loop measurement runs `warmup` steps, then times `steps` training steps of raypose.loop's
train_epoch; the Ray figure is timed inside the worker, so it shows the cost of running the step
in a Ray Train worker (process placement, threads, DDP set-up), and Ray's start-up per run is
reported separately.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from raypose.config import Config, apply_overrides
from raypose.loop import build_model, build_optimizer, open_splits, train_epoch


def _loop_samples_per_s(cfg: Config, steps: int, warmup: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    train_set, _ = open_splits(cfg)
    model = build_model(cfg, "joint")
    if cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    device = torch.device("cpu")
    from raypose.dataset import iterate_batches

    def batches(epoch):
        while True:  # as many batches as asked for, whatever the dataset size
            yield from iterate_batches(train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed,
                                       epoch=epoch, drop_last=True)
            epoch += 1

    train_epoch(model, optimizer, batches(0), cfg, "joint", device, max_steps=warmup)
    stats = train_epoch(model, optimizer, batches(1), cfg, "joint", device, max_steps=steps)
    return stats["samples"] / stats["seconds"]


def bench_func_per_worker(loop_config: dict) -> None:
    import ray.train  # Ray: worker side

    from raypose.config import config_from_dict

    import tempfile

    cfg = config_from_dict(loop_config["config"])
    rate = _loop_samples_per_s(cfg, loop_config["steps"], loop_config["warmup"], loop_config["threads"])
    # Train V2's Result.metrics are those of the latest checkpoint: report a tiny one
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report({"samples_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_samples_per_s(cfg: Config, steps: int, warmup: int, threads: int) -> tuple:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            bench_func_per_worker,
            train_loop_config={"config": cfg.to_dict(), "steps": steps, "warmup": warmup,
                               "threads": threads},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="bench", storage_path=tmp),
        )
        start = time.perf_counter()
        result = trainer.fit()
        total = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    return result.metrics["samples_per_s"], total


def pipeline_samples_per_s(cfg: Config, batches: int) -> float:
    from raypose.dataset import iterate_batches

    train_set, _ = open_splits(cfg)
    samples = 0
    start = time.perf_counter()
    epoch = 0
    while samples < batches * cfg.data.batch_size:
        for batch in iterate_batches(train_set, cfg.data.batch_size, shuffle=True, seed=cfg.seed,
                                     epoch=epoch, drop_last=True):
            samples += len(batch["image"])
            if samples >= batches * cfg.data.batch_size:
                break
        epoch += 1
    return samples / (time.perf_counter() - start)


def add_arguments(parser) -> None:
    parser.add_argument("--data", default="data/synth", help="data directory (made with synth if missing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    import os

    if args.repeats < 1 or args.steps < 1:
        print("raypose bench train: error: --repeats and --steps must be >= 1", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count()
    cfg = Config()
    cfg.data.path = args.data
    cfg.data.batch_size = args.batch_size
    apply_overrides(cfg, args.overrides)
    cfg.validate()
    if not (Path(args.data) / "train.h5").exists():
        from raypose.synth import synthesize

        print(f"[raypose] no data in {args.data}: rendering a small synthetic set", flush=True)
        synthesize(args.data, 1000, 100, seed=0)
    from raypose.train import init_ray

    init_ray(num_cpus=threads)
    results = {"ray": [], "plain": [], "pipeline": [], "ray_run_seconds": []}
    print(f"[raypose] bench: batch {args.batch_size}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, {threads} threads, {args.repeats} repeats (alternating)", flush=True)
    for r in range(args.repeats):
        pipe = pipeline_samples_per_s(cfg, batches=max(args.steps, 10))
        plain = _loop_samples_per_s(cfg, args.steps, args.warmup, threads)
        ray_rate, ray_total = ray_samples_per_s(cfg, args.steps, args.warmup, threads)
        results["pipeline"].append(pipe)
        results["plain"].append(plain)
        results["ray"].append(ray_rate)
        results["ray_run_seconds"].append(ray_total)
        print(f"  repeat {r + 1}: input pipeline {pipe:8.1f}  plain loop {plain:6.2f}  "
              f"Ray Train loop {ray_rate:6.2f} samples/s  (Ray run incl. start-up {ray_total:.1f} s)",
              flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ray_ratio = [a / b for a, b in zip(results["ray"], results["plain"])]
    pipe_ratio = [a / b for a, b in zip(results["pipeline"], results["plain"])]
    print(f"median samples/s: input pipeline {med['pipeline']:.1f}, plain PyTorch loop "
          f"{med['plain']:.2f}, Ray Train loop (1 worker) {med['ray']:.2f}")
    print(f"Ray loop / plain loop: median {statistics.median(ray_ratio):.3f} "
          f"(per repeat: {', '.join(f'{x:.3f}' for x in ray_ratio)})")
    print(f"input pipeline / training step: median {statistics.median(pipe_ratio):.1f}x "
          f"(per repeat: {', '.join(f'{x:.1f}' for x in pipe_ratio)})")
    import ray

    ray.shutdown()
    return 0
