"""The GPU measurement of packed trials and resident data, run once on a machine with one NVIDIA
GPU, this repository and a CUDA build of torch (docs/benchmarks/2026-12-06-gpu-packing-owed.md):

    python jobs/gpu_bench.py --out "$OUT"

Stages, each a `raypose` command in a process of its own (its output in <out>/logs/), so that a
failed stage is recorded and the others still run:
  data      `raypose data synth`: --train samples with per-sample side colours (every
            augmentation, the flip included, runs)
  check     on the device: the resident batches against the host feed's (the same tensors for
            the same seed, the random numbers hashed in int64 there), and the packing probe
            (raypose.train.packing.probe_training_step) at both batch sizes
  packing   `raypose bench sweep --trials-per-gpu 1,2,4,8` at the demo's batch (16)
  single    `raypose bench sweep --no-packing` at batch 256: one trial with its data resident
            against the host feed with one and with two reader threads
  compile   `raypose bench train --compile --no-ray` at batch 256 (what decides whether
            scaling.compile should be on for GPU runs)
  tune      `raypose tune --gpus-per-worker 0.25`: four trials of a quarter GPU on a local Ray
            instance, with the packing check before them; each trial's device and peak memory
Writes <out>/gpu-bench.json (everything) and <out>/gpu-bench.md (the tables).

On a machine without a GPU, `--device cpu` with tiny sizes runs the same stages on the CPU (no
compile stage; the tune stage with CPU workers), to check the script itself.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the job's working dir holds raypose/


def raypose(args: list, log: Path, timeout: float) -> dict:
    """One `raypose` command in its own process; its output to log."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "raypose.cli", *map(str, args)]
    try:
        with open(log, "w") as f:
            f.write(" ".join(command) + "\n")
            f.flush()
            rc = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO
            ).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"command": " ".join(command[2:]), "rc": rc, "seconds": time.perf_counter() - start}


def check(data: Path, device_name: str, batches: list) -> dict:
    """The resident batches against the host feed's on the device, and the packing probe."""
    import numpy as np
    import torch

    from raypose.config import Config
    from raypose.data.dataset import PoseDataset, augmentation_draws, iterate_batches
    from raypose.data.resident import ResidentSplit, device_draws, iterate_resident
    from raypose.train import packing

    device = torch.device(device_name)
    out = {}
    positions = np.concatenate([np.arange(100_000), [2**40, 2**62]])
    on_device = device_draws(5, 9, torch.from_numpy(positions).to(device)).cpu().numpy()
    out["draws_equal"] = bool(np.array_equal(on_device, augmentation_draws(5, 9, positions)))
    train = PoseDataset(data / "train.h5", exclude_subjects=["S8"], augment=True, seed=5)
    resident = ResidentSplit(train, device)
    order = {"shuffle": True, "seed": 5, "drop_last": True, "channels_last": True}
    worst, same, count = 0.0, True, 0
    batch = batches[0]
    for epoch in range(2):
        host = iterate_batches(train, batch, epoch=epoch, device=device, **order)
        for a, b in zip(host, iterate_resident(resident, batch, epoch=epoch, **order)):
            for key in a:
                same &= bool(torch.equal(a[key], b[key]))
                if a[key].is_floating_point():
                    worst = max(worst, float((a[key] - b[key]).abs().max()))
            count += 1
    out["resident_batches"] = {
        "batch_size": batch,
        "batches": count,
        "equal": same,
        "max_abs_difference": worst,
    }
    out["probe"] = {}
    for batch in batches:
        cfg = Config()
        cfg.data.batch_size = batch
        cfg.scaling.gpu, cfg.scaling.gpu_share = True, 0.125
        out["probe"][str(batch)] = packing.probe_training_step(cfg.to_dict())
    return out


def tune_results(experiment: Path) -> list:
    """Each trial's device, peak GPU memory and the interval it ran (Tune's result.json)."""
    trials = []
    for path in sorted(experiment.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        first = rows[0]
        trials.append(
            {
                "trial_id": first["trial_id"],
                "device": first.get("device"),
                "gpu_memory_peak_bytes": max(
                    (r["gpu_memory_peak_bytes"] for r in rows if "gpu_memory_peak_bytes" in r),
                    default=None,
                ),
                "samples_per_s": [r.get("samples_per_s") for r in rows],
                "started_at": first["epoch_ended_at"]
                - first["epoch_seconds"]
                - first["startup_seconds"],
                "ended_at": rows[-1]["epoch_ended_at"],
            }
        )
    return trials


def markdown(record: dict) -> str:
    from raypose.train.bench_sweep import table

    machine = record["machine"]
    lines = [
        f"# GPU packing and resident data ({record['date']})",
        "",
        f"- **Machine:** {machine.get('gpu', 'no GPU')}; {machine['cpu_count']} CPU cores; "
        f"torch {machine['torch']}; Ray {machine.get('ray')}; {machine['platform']}",
        f"- **Code:** commit {machine.get('commit')}",
        f"- **Command:** `{record['command']}`",
        "",
        "## Stages",
        "",
        "| stage | exit | s |",
        "|---|---|---|",
    ]
    for name, stage in record["stages"].items():
        lines.append(f"| {name} | {stage.get('rc')} | {stage.get('seconds', 0):.0f} |")
    if "check" in record:
        c = record["check"]
        lines += [
            "",
            "## Resident batches against the host feed on the device",
            "",
            f"- device draws equal to the host's: {c.get('draws_equal')}",
            f"- batches: {json.dumps(c.get('resident_batches'))}",
            f"- packing probe: {json.dumps(c.get('probe'))}",
        ]
    for name in ("packing", "single"):
        if name in record:
            lines += ["", f"## bench sweep: {name}", "", table(record[name])]
    if "compile" in record:
        lines += ["", "## bench train --compile", "", "```", record["compile"].strip(), "```"]
    if "tune" in record:
        trials = record["tune"]
        together = bool(trials) and max(t["started_at"] for t in trials) < min(
            t["ended_at"] for t in trials
        )
        lines += ["", "## raypose tune, four trials on one device", ""]
        lines += [f"- all {len(trials)} trials ran at once: {together}"]
        lines += [f"- {json.dumps(t)}" for t in trials]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder ($OUT)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--train", type=int, default=6000, help="synthetic training samples")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trials-per-gpu", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=16, help="packing (the demo's: 16)")
    parser.add_argument("--single-batch-size", type=int, default=256)
    parser.add_argument("--stage-timeout", type=float, default=480.0)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--check-only", help=argparse.SUPPRESS)  # internal: the check stage
    args = parser.parse_args(argv)
    if args.check_only:
        batches = [args.batch_size, args.single_batch_size]
        result = check(Path(args.out) / "data", args.device, batches)
        Path(args.check_only).write_text(json.dumps(result, indent=2))
        return 0
    if not args.out:
        parser.error("--out (or $OUT) names the output folder")
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    machine = {
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        machine["commit"] = commit.stdout.strip() + (
            " with uncommitted changes" if status.stdout.strip() else ""
        )
    except OSError:  # no git here: the record says so
        machine["commit"] = None
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python", "jobs/gpu_bench.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "stages": {},
    }
    sets = [x for o in args.overrides for x in ("--set", o)]
    timed = ["--seconds", args.seconds, "--warmup", args.warmup, "--device", args.device]
    data = out / "data"
    stages = [
        (
            "data",
            ["data", "synth", "--out", data, "--train", args.train, "--test", 100],
            ["--seed", 0, "--side-colours", "per-sample", "--force"],
        ),
        (
            "packing",
            ["bench", "sweep", "--data", data, "--trials-per-gpu", args.trials_per_gpu],
            ["--batch-size", args.batch_size, "--no-single", *timed, *sets]
            + ["--out", out / "packing.json", "--force"],
        ),
        (
            "single",
            ["bench", "sweep", "--data", data, "--no-packing", "--trials-per-gpu", 1],
            ["--batch-size", args.single_batch_size, *timed, *sets]
            + ["--out", out / "single.json", "--force"],
        ),
    ]
    if args.device == "cuda" and not args.no_compile:
        stages.append(
            (
                "compile",
                ["bench", "train", "--data", data, "--device", "cuda", "--batch-size"],
                [args.single_batch_size, "--steps", 100, "--warmup", 5, "--repeats", 2]
                + ["--compile", "--no-ray", *sets],
            )
        )
    if not args.no_tune:
        space = out / "tune-space.yaml"
        space.write_text(
            "parameters:\n  lr: {distribution: loguniform, low: 2.0e-4, high: 1.2e-3}\n"
        )
        share = ["--gpus-per-worker", 0.25] if args.device == "cuda" else ["--max-concurrent", 4]
        stages.append(
            (
                "tune",
                ["tune", "--space", space, "--data", data, "--storage", out / "tune"],
                ["--name", f"packed-{int(time.time())}", "--samples", 4, "--epochs", 2]
                + ["--workers-per-trial", 1, *share, *sets],
            )
        )
    for name, head, tail in stages:
        print(f"[gpu_bench] {name} ...", flush=True)
        stage = raypose([*head, *tail], logs / f"{name}.log", args.stage_timeout)
        record["stages"][name] = stage
        print(f"[gpu_bench] {name}: exit {stage['rc']} in {stage['seconds']:.0f} s", flush=True)
        if name == "data":  # the check runs on the data, in a process of its own
            check_json = out / "check.json"
            command = [sys.executable, __file__, "--out", out, "--device", args.device]
            command += ["--batch-size", args.batch_size, "--single-batch-size"]
            command += [args.single_batch_size, "--check-only", check_json]
            start = time.perf_counter()
            with open(logs / "check.log", "w") as f:
                rc = subprocess.run(list(map(str, command)), stdout=f, stderr=subprocess.STDOUT)
            record["stages"]["check"] = {
                "rc": rc.returncode,
                "seconds": time.perf_counter() - start,
            }
            if check_json.exists():
                record["check"] = json.loads(check_json.read_text())
        if name in ("packing", "single") and (out / f"{name}.json").exists():
            record[name] = json.loads((out / f"{name}.json").read_text())
        if name == "compile":
            record["compile"] = "\n".join((logs / "compile.log").read_text().splitlines()[1:])
        if name == "tune":
            experiments = sorted((out / "tune").glob("packed-*"))
            if experiments:
                record["tune"] = tune_results(experiments[-1])
        (out / "gpu-bench.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "gpu-bench.md").write_text(markdown(record))
    print(f"[gpu_bench] {out / 'gpu-bench.json'} and {out / 'gpu-bench.md'}", flush=True)
    return 0 if all(s["rc"] == 0 for s in record["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
