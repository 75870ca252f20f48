"""`raypose demo`: the whole chain on this machine, on the embedded defaults.

1. synthetic data (made on first use),  2. an Optuna sweep of Ray Train runs on a local Ray
instance over the mission's parameters (search_spaces/smoke.yaml: lrn_alpha, lrn_beta, lambda,
schedule with pretrain_share, lr), the paper's settings first,  3. evaluation of the best
checkpoint on the test split.  Prints the best trial, its test MPJPE against the mean-pose
baseline and the paper-settings trial, and where the report is.

The defaults are sized for a 2-core machine (docs/benchmarks/ has the measured time): 6,400 training
samples rendered, 1,600 of them per epoch, so each of a trial's 4 epochs sees new ones.
--samples, --epochs and --train make the sweep longer.
"""

import datetime
import time
from pathlib import Path

from raypose import console
from raypose.config import Config, ConfigError, set_value

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "smoke.yaml"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--root", default="runs/demo", help="folder for data, experiments and reports"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="experiment storage (default: <root>/experiments; s3://... works too)",
    )
    parser.add_argument("--samples", type=int, default=6, help="trials in the sweep")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (at most)")
    parser.add_argument(
        "--train",
        type=int,
        default=8000,
        help="synthetic samples in train.h5 (training and validation subjects)",
    )
    parser.add_argument(
        "--epoch-samples",
        type=int,
        default=1600,
        help="training samples per epoch, new ones each epoch until a pass over "
        "the training split is used up (0: the whole split every epoch)",
    )
    parser.add_argument(
        "--val-samples",
        type=int,
        default=400,
        help="validation samples scored after each epoch (0: all)",
    )
    parser.add_argument("--test", type=int, default=300, help="synthetic test samples")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at a time (default: as many as the CPUs fit)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--space", default=str(SPACE), help="search-space YAML")


def demo_config(args, data: Path) -> Config:
    """The sweep's base config from the demo's flags; raises ConfigError naming the flag."""
    for flag, value in (
        ("--samples", args.samples),
        ("--train", args.train),
        ("--test", args.test),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    for flag, value in (
        ("--epoch-samples", args.epoch_samples),
        ("--val-samples", args.val_samples),
    ):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (0: all), got {value}")
    if (
        args.epoch_samples > args.train
    ):  # the training split is a part of --train (preflight checks it)
        raise ConfigError(f"--epoch-samples {args.epoch_samples} is more than --train {args.train}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.epoch_samples and args.batch_size * args.workers > args.epoch_samples:
        raise ConfigError(
            f"--batch-size {args.batch_size} with --workers {args.workers} needs "
            f"{args.batch_size * args.workers} samples per epoch, more than "
            f"--epoch-samples {args.epoch_samples}: an epoch would take no training step"
        )
    cfg = Config()
    set_value(cfg, "data.path", str(data), "--root")
    set_value(cfg, "storage.uri", args.storage or str(Path(args.root) / "experiments"), "--storage")
    set_value(cfg, "schedule.epochs", args.epochs, "--epochs")
    set_value(cfg, "scaling.workers", args.workers, "--workers")
    # small batches: more steps in the few epochs a demo has
    set_value(cfg, "data.batch_size", args.batch_size, "--batch-size")
    set_value(cfg, "data.epoch_samples", args.epoch_samples, "--epoch-samples")
    set_value(cfg, "data.max_val_samples", args.val_samples, "--val-samples")
    return cfg.validate(
        {
            "data.path": "--root",
            "storage.uri": "--storage",
            "schedule.epochs": "--epochs",
            "scaling.workers": "--workers",
            "data.batch_size": "--batch-size",
            "data.epoch_samples": "--epoch-samples",
            "data.max_val_samples": "--val-samples",
        }
    )


def check_inputs(args, cfg: Config) -> None:
    """The demo's paths and the Ray address, checked before any data is rendered."""
    from raypose import storage, validate

    validate.output_dir(args.root, "--root")
    data = Path(args.root) / "data"
    validate.output_dir(data, "--root")
    present = [n for n in ("train.h5", "test.h5") if (data / n).exists()]
    if len(present) == 1:  # rendering would replace the one that is there
        raise validate.InputError(
            f"--root {args.root}: {data / present[0]} exists without its "
            "other split; remove it or use another --root"
        )
    loc = storage.parse(cfg.storage.uri)
    if loc.scheme == "s3":
        storage.check_reachable(loc, create=False)
    else:
        validate.output_dir(loc.path, "--storage")
    validate.ray_address_from(None)


def demo_split(n_train: int, cfg: Config) -> tuple:
    """(validation subjects without a sample, training samples) of the train.h5 that
    `--train n_train` renders: synth spreads the samples evenly over its training subjects."""
    from raypose.data.synth import TRAIN_SUBJECTS, subject_counts

    counts = subject_counts(n_train, TRAIN_SUBJECTS)
    empty = [s for s in cfg.data.val_subjects if counts.get(s, 0) == 0]
    return empty, sum(c for s, c in counts.items() if s not in cfg.data.val_subjects)


def check_render(args, cfg: Config) -> None:
    """The data that --train would render, checked before it is rendered: every validation
    subject gets a sample, and the training split fills an epoch (--epoch-samples, or a batch
    per worker). ConfigError naming --train and the smallest value that works."""
    from raypose.data.synth import TRAIN_SUBJECTS

    foreign = [s for s in cfg.data.val_subjects if s not in TRAIN_SUBJECTS]
    if foreign:  # no --train would render them
        raise ConfigError(
            f"data.val_subjects: {', '.join(map(str, foreign))} is not a subject of "
            f"the synthetic train.h5 ({', '.join(TRAIN_SUBJECTS)})"
        )
    per_epoch = args.epoch_samples or args.batch_size * args.workers

    def fits(n):
        empty, train = demo_split(n, cfg)
        return not empty and train >= per_epoch

    if fits(args.train):
        return
    empty, train = demo_split(args.train, cfg)
    # the smallest --train that fits: both counts grow with --train, so a binary search
    low, high = args.train, max(2 * args.train, 8)
    while not fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    need = high
    if empty:
        why = (
            f"no sample of the validation subject {', '.join(empty)} (the samples are spread "
            f"evenly over {', '.join(TRAIN_SUBJECTS)})"
        )
    elif args.epoch_samples:
        why = (
            f"{train} training samples besides the validation subjects', fewer than "
            f"--epoch-samples {args.epoch_samples}"
        )
    else:
        why = (
            f"{train} training samples besides the validation subjects', fewer than one batch "
            f"per worker (--batch-size {args.batch_size} x --workers {args.workers})"
        )
    raise ConfigError(
        f"--train {args.train}: the synthetic train.h5 would hold {why}; give "
        f"--train {need} or more (nothing was written)"
    )


def run(args) -> int:
    from raypose.data import synth
    from raypose.evaluation import evaluate
    from raypose.search import sweep as tune
    from raypose.search.space import load_space

    start = time.perf_counter()
    data = Path(args.root) / "data"
    # every flag, path and the search space are checked before any data is rendered
    cfg = demo_config(args, data)
    load_space(args.space).check_against(cfg)
    check_inputs(args, cfg)
    if not ((data / "train.h5").exists() and (data / "test.h5").exists()):
        check_render(args, cfg)
        print(f"[raypose demo] 1/3 rendering synthetic data into {data}", flush=True)
        synth.synthesize(str(data), args.train, args.test, seed=0)
    else:
        print(f"[raypose demo] 1/3 using the synthetic data in {data}", flush=True)
    name = "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    print(
        f"[raypose demo] 2/3 sweep {name}: {args.samples} trials of up to {args.epochs} epochs, "
        f"{args.workers} Ray Train worker(s) each, the paper's settings first",
        flush=True,
    )
    try:
        best = tune.run_sweep(
            cfg, args.space, name, args.samples, max_concurrent=args.max_concurrent
        )
        print("[raypose demo] 3/3 evaluating the best checkpoint on the test split", flush=True)
        report = evaluate.evaluate(
            best["experiment"], out_dir=str(Path(args.root) / "reports" / name)
        )
    finally:
        import ray

        ray.shutdown()
    test = report["mean_over_actions"]["mpjpe"]
    baseline = report["mean_pose_baseline"]["mean_over_actions"]
    paper = best.get("paper_defaults") or {}
    versus_paper = ""
    if paper.get("value"):
        versus_paper = (
            f"; on validation {best['value']:.1f} mm against the paper settings' "
            f"{paper['value']:.1f} mm ({best['value'] / paper['value']:.2f}x)"
        )
    print(
        f"[raypose demo] done in {time.perf_counter() - start:.0f} s. Best trial {best['trial_id']} "
        f"({', '.join(f'{k}={console.format_value(v)}' for k, v in best['params'].items())})",
        flush=True,
    )
    print(
        f"[raypose demo] test MPJPE {test:.1f} mm vs mean-pose baseline {baseline:.1f} mm "
        f"({test / baseline:.2f}x, means over actions){versus_paper}",
        flush=True,
    )
    print(f"[raypose demo] report: {report['outputs']['local']}/report.md", flush=True)
    return 0
