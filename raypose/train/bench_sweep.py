"""`raypose bench sweep`: the training throughput of a sweep whose trials share one device, for
each packing, and one trial's loop with its data resident on the device against the host feed.

Packing (`--trials-per-gpu 1,2,4,8`): for each k, k processes run raypose.train.loop.train_epoch
at once on the one device, as k trials of a packed sweep do (each trial of `raypose tune
--gpus-per-worker 1/k` is a Ray Train worker process of its own, with its own CUDA context, on
a 1/k share of the GPU; the Ray Train loop runs at the plain loop's speed,
docs/benchmarks/2026-12-05-earlier-h200.md). Each process opens the data, builds the model, takes
`--warmup` steps, waits for the others, then trains for `--seconds` in rounds of ROUND_STEPS steps
(each round ends with train_epoch's one wait for the device). Its data is resident or read by
the host feed as a trial's would be (data.feed, raypose.train.packing.resident_decision with
a GPU share of 1/k). Reported per k: training samples/s summed over the k trials, that sum
against one trial's, trial-epochs per hour at `--epoch-samples` (training steps only:
validation and checkpoints are not in it), each trial's peak GPU memory and start and end times.

Single trial (`--single-batch-size`): one process each with data.feed resident, then the host feed
with one reader thread, then with two (data.reader_threads), timed the same way.

Prints a table and writes everything as JSON to `--out`.
"""

import json
import multiprocessing
import os
import platform
import queue
import statistics
import time
import traceback
from pathlib import Path

import torch

from raypose import validate
from raypose.config import GPU_SHARES, Config, apply_overrides, config_from_dict
from raypose.train import packing
from raypose.train.bench import pick_device
from raypose.train.loop import (
    amp_active,
    build_model,
    build_optimizer,
    epoch_batches,
    maybe_compile,
    open_splits,
    train_epoch,
)

# steps between the timed loop's waits for the device (train_epoch's one wait per call): on
# the CPU a wait costs nothing, and a round of one step ends the timing closest to --seconds
ROUND_STEPS = {"cuda": 20, "cpu": 1}
TRIAL_TIMEOUT_S = 900  # the most a process may take for its start, warm-up and timed seconds
PACKINGS = tuple(round(1 / share) for share in GPU_SHARES)  # 1, 2, 4, 8, 16


# ----------------------------------------------------------------------------------------------
# Runs in each trial's process


def _trial_config(config: dict, trials: int, device_type: str, trial: int) -> Config:
    """A trial's config: its own seed, and a GPU share of 1/trials on CUDA (what decides whether
    its data is resident, as in a packed sweep)."""
    cfg = config_from_dict(config)
    cfg.seed = cfg.seed + trial
    cfg.scaling.gpu = device_type == "cuda"
    cfg.scaling.gpu_share = 1.0 / trials
    return cfg


def trial_process(spec: dict, barrier, results) -> None:
    """One trial: warm-up, the barrier, then timed rounds; puts its figures (or its error) on
    `results`."""
    trial = spec["trial"]
    try:
        device = torch.device(spec["device"])
        torch.set_num_threads(spec["threads"])
        cfg = _trial_config(spec["config"], spec["trials"], device.type, trial)
        train_set, _ = open_splits(cfg)
        keep_resident, why = packing.resident_decision(cfg, len(train_set), device)
        resident = None
        if keep_resident:
            from raypose.data.resident import ResidentSplit

            resident = ResidentSplit(train_set, device)
        readers = packing.reader_threads(cfg, device)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, "joint").to(device)
        if cfg.scaling.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model)
        train_model = maybe_compile(model, cfg)

        def batches():
            epoch = 0
            while True:  # as many batches as the rounds take, whatever the split's size
                yield from epoch_batches(
                    train_set, cfg, epoch, device=device, resident=resident, readers=readers
                )
                epoch += 1

        stream = batches()
        if spec["warmup"]:
            train_epoch(train_model, optimizer, stream, cfg, "joint", device, spec["warmup"])
        barrier.wait(timeout=TRIAL_TIMEOUT_S)
        started_at, start = time.time(), time.perf_counter()
        samples = steps = 0
        round_steps = ROUND_STEPS.get(device.type, 1)
        while time.perf_counter() - start < spec["seconds"]:
            stats = train_epoch(train_model, optimizer, stream, cfg, "joint", device, round_steps)
            samples += stats["samples"]
            steps += stats["steps"]
        seconds = time.perf_counter() - start
        results.put(
            {
                "trial": trial,
                "samples": samples,
                "steps": steps,
                "seconds": seconds,
                "samples_per_s": samples / seconds,
                "started_at": started_at,
                "ended_at": started_at + seconds,
                "resident": resident is not None,
                "feed": "resident" if resident is not None else f"host feed, {readers} reader(s)",
                "why": why,
                "gpu_memory_peak_bytes": torch.cuda.max_memory_allocated(device)
                if device.type == "cuda"
                else None,
            }
        )
    except BaseException as e:
        barrier.abort()  # the other trials stop waiting for this one
        results.put({"trial": trial, "error": f"{type(e).__name__}: {e}".strip()[:2000]})
        if not isinstance(e, Exception):
            raise
        traceback.print_exc()


# ----------------------------------------------------------------------------------------------
# Runs in the bench's own process


def run_trials(config: dict, device: torch.device, trials: int, args) -> dict:
    """k = trials processes at once on device; returns their figures, summed."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier = context.Barrier(trials)
    results = context.Queue()
    threads = max(1, (args.threads or os.cpu_count() or 1) // trials)
    processes = []
    for trial in range(trials):
        spec = {
            "trial": trial,
            "trials": trials,
            "config": config,
            "device": str(device),
            "threads": threads,
            "warmup": args.warmup,
            "seconds": args.seconds,
        }
        process = context.Process(
            target=trial_process, args=(spec, barrier, results), name=f"raypose-bench-{trial}"
        )
        process.start()
        processes.append(process)
    rows, deadline = [], time.monotonic() + TRIAL_TIMEOUT_S + args.seconds
    try:
        while len(rows) < trials:
            try:
                rows.append(results.get(timeout=1.0))
            except queue.Empty:
                if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                    if results.empty():
                        break
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    rows.sort(key=lambda r: r["trial"])
    errors = [r["error"] for r in rows if "error" in r]
    if len(rows) < trials and not errors:
        errors = [f"{trials - len(rows)} trial process(es) ended without a result"]
    if errors:
        real = [e for e in errors if not e.startswith("BrokenBarrierError")] or errors
        return {"trials": trials, "error": real[0], "rows": rows}
    rates = [r["samples_per_s"] for r in rows]
    return {
        "trials": trials,
        "samples_per_s": sum(rates),
        "per_trial_samples_per_s": rates,
        # all trials were training together from the last start to the first end
        "overlap_seconds": min(r["ended_at"] for r in rows) - max(r["started_at"] for r in rows),
        "rows": rows,
    }


def _machine(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def parse_packings(text: str) -> list:
    """`--trials-per-gpu 1,2,4,8`: k values, each one whose share 1/k is a GPU_SHARES entry."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v not in PACKINGS for v in values) or len(set(values)) != len(values):
        raise validate.InputError(
            f"--trials-per-gpu must list distinct counts among {', '.join(map(str, PACKINGS))} "
            f"separated by commas (e.g. 1,2,4,8), got {validate.shown(text)}"
        )
    return sorted(values)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data", default="data/synth", help="data directory (made with synth if missing)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="the one device all trials train on (auto: cuda when torch sees a GPU)",
    )
    parser.add_argument(
        "--trials-per-gpu",
        default="1,2,4,8",
        help="packings to measure: trials at once on the device, e.g. 1,2,4,8",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="per trial (the demo's: 16)")
    parser.add_argument(
        "--single-batch-size",
        type=int,
        default=None,
        help="batch of the single-trial resident-against-host-feed loop (default: --batch-size)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timing")
    parser.add_argument(
        "--epoch-samples",
        type=int,
        default=0,
        help="samples per trial-epoch for trial-epochs/hour (0: the training split's size)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads shared by the trials (default: all cores)",
    )
    parser.add_argument("--no-single", action="store_true", help="skip the single-trial loops")
    parser.add_argument(
        "--no-packing", action="store_true", help="skip the packings (the single-trial loops only)"
    )
    parser.add_argument("--out", default="runs/bench/sweep.json", help="the JSON file to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _config(args, batch_size: int, **data) -> dict:
    cfg = Config()
    cfg.data.path = str(Path(args.data).resolve())
    cfg.data.batch_size = batch_size
    sources = {"data.batch_size": "--batch-size"}
    apply_overrides(cfg, args.overrides, sources=sources)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.validate(sources)
    return cfg.to_dict()


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB"


def run(args) -> int:
    # every flag is checked before data is rendered or a process started
    packings = parse_packings(args.trials_per_gpu)
    if args.no_packing and args.no_single:
        raise validate.InputError("--no-packing with --no-single leaves nothing to measure")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--single-batch-size", args.single_batch_size),
        ("--threads", args.threads),
    ):
        validate.positive(value, flag)
    if not args.seconds > 0:
        raise validate.InputError(f"--seconds must be > 0, got {args.seconds}")
    for flag, value in (("--warmup", args.warmup), ("--epoch-samples", args.epoch_samples)):
        if value < 0:
            raise validate.InputError(f"{flag} must be >= 0, got {value}")
    data = validate.output_dir(args.data, "--data")
    if not (data / "train.h5").exists() and (data / "test.h5").exists():
        raise validate.InputError(
            f"--data {args.data}: holds test.h5 but no train.h5; give a "
            "folder with both, or one without either for a rendered set"
        )
    out = validate.output_file(args.out, "--out", args.force, suffixes=(".json",))
    device = pick_device(args.device)
    single_batch = args.single_batch_size or args.batch_size
    config = _config(args, args.batch_size)
    single = {
        "resident": _config(args, single_batch, feed="resident"),
        "host feed, 1 reader": _config(args, single_batch, feed="host", reader_threads=1),
        "host feed, 2 readers": _config(args, single_batch, feed="host", reader_threads=2),
    }
    if not (data / "train.h5").exists():
        from raypose.data.synth import synthesize

        print(f"[raypose] no data in {args.data}: rendering a small synthetic set", flush=True)
        synthesize(args.data, 1000, 100, seed=0, side_colours="per-sample")
    cfg = config_from_dict(config)
    train_set, _ = open_splits(cfg)
    epoch_samples = args.epoch_samples or cfg.data.epoch_samples or len(train_set)
    machine = _machine(device)
    name = machine.get("gpu", f"CPU, {args.threads or os.cpu_count()} threads")
    print(
        f"[raypose] bench sweep on {device.type} ({name}): {', '.join(map(str, packings))} "
        f"trial(s) at once, batch {args.batch_size} per trial, {args.seconds:g} s timed after "
        f"{args.warmup} warm-up steps; bf16 autocast "
        f"{'on' if amp_active(device, cfg.scaling.amp) else 'off'}; data.feed "
        f"{cfg.data.feed}",
        flush=True,
    )
    report = {
        "machine": machine,
        "settings": {
            "trials_per_gpu": packings,
            "batch_size": args.batch_size,
            "single_batch_size": single_batch,
            "seconds": args.seconds,
            "warmup_steps": args.warmup,
            "round_steps": ROUND_STEPS.get(device.type, 1),
            "epoch_samples": epoch_samples,
            "training_samples": len(train_set),
            "data": str(Path(args.data).resolve()),
            "overrides": list(args.overrides),
            "compile": cfg.scaling.compile,
        },
        "packing": [],
        "single": [],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for k in [] if args.no_packing else packings:
        result = run_trials(config, device, k, args)
        if "error" not in result:
            result["trial_epochs_per_hour"] = result["samples_per_s"] * 3600 / epoch_samples
        report["packing"].append(result)
        print(f"  {k} trial(s): {_packing_line(result)}", flush=True)
    one = next((r for r in report["packing"] if r["trials"] == 1 and "error" not in r), None)
    for r in report["packing"]:
        if one is not None and "error" not in r:
            r["vs_one_trial"] = r["samples_per_s"] / one["samples_per_s"]
    if not args.no_single:
        for feed, feed_config in single.items():
            result = run_trials(feed_config, device, 1, args)
            result["feed"] = feed
            report["single"].append(result)
            print(f"  single trial, {feed}: {_packing_line(result)}", flush=True)
    with validate.replace_atomically(out) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"[raypose] bench sweep: {out}")
    return 0


def _packing_line(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    return f"{result['samples_per_s']:,.1f} samples/s"


def table(report: dict) -> str:
    """The report as a Markdown table for people (and for docs/benchmarks/)."""
    s = report["settings"]
    lines = []
    if report["packing"]:
        lines += [
            f"packed trials on one {report['machine']['device']} device, batch "
            f"{s['batch_size']} per trial, {s['seconds']:g} s timed; trial-epochs of "
            f"{s['epoch_samples']:,} samples (training steps only)",
            "",
            "| trials at once | samples/s summed | vs 1 trial | per trial (median) | "
            "trial-epochs/hour | peak GPU memory per trial | data |",
            "|---|---|---|---|---|---|---|",
        ]
    for r in report["packing"]:
        if "error" in r:
            lines.append(f"| {r['trials']} | failed: {r['error'][:120]} | | | | | |")
            continue
        peaks = [row["gpu_memory_peak_bytes"] for row in r["rows"]]
        peak = max(peaks) if all(p is not None for p in peaks) else None
        feeds = sorted({row["feed"] for row in r["rows"]})
        lines.append(
            f"| {r['trials']} | {r['samples_per_s']:,.1f} | {r.get('vs_one_trial', float('nan')):.2f}x "
            f"| {statistics.median(r['per_trial_samples_per_s']):,.1f} "
            f"| {r['trial_epochs_per_hour']:,.0f} | {_gb(peak)} | {', '.join(feeds)} |"
        )
    if report["single"]:
        host = next(
            (
                r
                for r in report["single"]
                if r["feed"] == "host feed, 1 reader" and "error" not in r
            ),
            None,
        )
        lines += [
            *([""] if lines else []),
            f"one trial on one {report['machine']['device']} device, batch "
            f"{s['single_batch_size']}, {s['seconds']:g} s timed:",
            "",
            "| data | samples/s | vs host feed, 1 reader | peak GPU memory |",
            "|---|---|---|---|",
        ]
        for r in report["single"]:
            if "error" in r:
                lines.append(f"| {r['feed']} | failed: {r['error'][:120]} | | |")
                continue
            ratio = f"{r['samples_per_s'] / host['samples_per_s']:.2f}x" if host else "-"
            lines.append(
                f"| {r['feed']} | {r['samples_per_s']:,.1f} | {ratio} "
                f"| {_gb(r['rows'][0]['gpu_memory_peak_bytes'])} |"
            )
    return "\n".join(lines)
