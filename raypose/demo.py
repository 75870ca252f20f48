"""`raypose demo`: the whole chain on this machine, on the embedded defaults.

1. synthetic data (made on first use),  2. a small Optuna sweep of Ray Train runs on a local Ray
instance,  3. evaluation of the best checkpoint.  Prints where the report is and the best MPJPE.
"""

import datetime
import sys
import time
from pathlib import Path

from raypose.config import Config, ConfigError, set_value

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "smoke.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--root", default="runs/demo", help="folder for data, experiments and reports")
    parser.add_argument("--storage", default=None,
                        help="experiment storage (default: <root>/experiments; s3://... works too)")
    parser.add_argument("--samples", type=int, default=4, help="trials in the sweep")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial")
    parser.add_argument("--train", type=int, default=1500, help="synthetic training samples")
    parser.add_argument("--test", type=int, default=300, help="synthetic test samples")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers per trial")
    parser.add_argument("--space", default=str(SPACE), help="search-space YAML")


def run(args) -> int:
    from raypose import evaluate, synth, tune

    start = time.perf_counter()
    root = Path(args.root)
    data = root / "data"
    if not ((data / "train.h5").exists() and (data / "test.h5").exists()):
        print(f"[raypose demo] 1/3 rendering synthetic data into {data}", flush=True)
        synth.synthesize(str(data), args.train, args.test, seed=0)
    else:
        print(f"[raypose demo] 1/3 using the synthetic data in {data}", flush=True)
    cfg = Config()
    try:
        set_value(cfg, "data.path", str(data), "--root")
        set_value(cfg, "storage.uri", args.storage or str(root / "experiments"), "--storage")
        set_value(cfg, "schedule.epochs", args.epochs, "--epochs")
        set_value(cfg, "scaling.workers", args.workers, "--workers")
        cfg.data.batch_size = 16  # per worker: more steps in the few epochs a demo has
        cfg.validate()
        name = "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        print(f"[raypose demo] 2/3 sweep {name}: {args.samples} trials x {args.epochs} epochs, "
              f"{args.workers} Ray Train workers each", flush=True)
        best = tune.run_sweep(cfg, args.space, name, args.samples, max_concurrent=None)
        print("[raypose demo] 3/3 evaluating the best checkpoint on the test split", flush=True)
        report = evaluate.evaluate(best["experiment"])
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"raypose demo: error: {e}", file=sys.stderr)
        return 2
    finally:
        import ray

        ray.shutdown()
    print(f"[raypose demo] done in {time.perf_counter() - start:.0f} s. Best trial {best['trial_id']} "
          f"({best['params']}): validation MPJPE {best['value']:.1f} mm; test MPJPE "
          f"{report['mean_over_actions']['mpjpe']:.1f} mm vs mean-pose baseline "
          f"{report['mean_pose_baseline']['mpjpe']:.1f} mm", flush=True)
    print(f"[raypose demo] report: {report['outputs']['local']}/report.md", flush=True)
    return 0
