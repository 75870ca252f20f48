"""Trials that share one GPU: a local Ray instance that declares one GPU (this machine has none,
so it is a resource label without CUDA) runs four trials of a quarter GPU each at once, and each
worker, given its share on a node where torch sees no CUDA device, trains on the CPU and says so
once."""

import glob
import json
import threading
from pathlib import Path

import pytest

from raypose.config import set_gpus_per_worker
from raypose.search.sweep import run_sweep
from raypose.train.run import run_training
from tests.support import tiny_config

SPACE = (
    "metric: val_mpjpe\nparameters:\n  lr: {distribution: loguniform, low: 2.0e-4, high: 1.2e-3}\n"
)


@pytest.fixture
def ray_with_one_gpu():
    """A local Ray instance with 8 logical CPUs and one declared GPU; always shut down."""
    import ray

    ray.init(
        num_cpus=8,
        num_gpus=1,
        include_dashboard=True,  # the State API, which a sweep needs
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _results(experiment: Path) -> dict:
    """Every trial's reports, from Tune's result.json in the trial's folder."""
    trials = {}
    for path in glob.glob(str(experiment / "*" / "result.json")):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        if rows:
            trials[rows[0]["trial_id"]] = rows
    return trials


@pytest.mark.slow  # a Ray instance of its own with a declared GPU: about 30 s
def test_a_run_on_a_gpu_share_without_cuda_trains_on_the_cpu_and_says_so_once(
    ray_with_one_gpu, tiny_data, tmp_path, capsys
):
    """`raypose train --gpus-per-worker 0.25`: the share reaches Ray Train's ScalingConfig (the
    run holds a quarter of the declared GPU), and the worker trains on the CPU."""
    ray = ray_with_one_gpu
    cfg = tiny_config(
        tiny_data,
        tmp_path / "exp",
        name="quarter",
        scaling__workers=1,
        schedule__epochs=1,
        model__fc1_width=64,
        model__fc2_width=64,
    )
    sources = {}
    set_gpus_per_worker(cfg, "1/4", "--gpus-per-worker", sources)
    cfg.validate(sources)
    held = []
    done = threading.Event()

    def watch():  # the GPU Ray counts as taken while the run trains
        while not done.is_set():
            held.append(1.0 - ray.available_resources().get("GPU", 0.0))
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_training(cfg)
    finally:
        done.set()
        watcher.join()
    out = capsys.readouterr().out
    assert result.metrics["device"] == "cpu" and "gpu_memory_peak_bytes" not in result.metrics
    assert out.count("but torch sees no CUDA device here") == 1, out  # rank 0's line, once
    epoch_lines = [line for line in out.splitlines() if "[raypose] epoch 1/1" in line]
    assert len(epoch_lines) == 1 and "peak GPU memory" not in epoch_lines[0], out
    assert "the probe on a GPU share found no CUDA device" in out, out
    # the probe and then the worker each held exactly a quarter, never more
    assert max(held) == pytest.approx(0.25, abs=1e-6), sorted(set(held))


@pytest.mark.slow  # four trials at once on the 2-core machine: about 70 s
def test_four_quarter_gpu_trials_run_at_once_and_train_on_the_cpu(
    ray_with_one_gpu, tiny_data, tmp_path, capsys
):
    ray = ray_with_one_gpu
    from ray.util.state import get_log, list_actors

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    cfg = tiny_config(
        tiny_data,
        tmp_path / "exp",
        scaling__workers=1,
        model__fc1_width=64,  # small heads: four trials train side by side on 2 cores
        model__fc2_width=64,
    )
    sources = {}
    set_gpus_per_worker(cfg, "0.25", "--gpus-per-worker", sources)
    assert (cfg.scaling.gpu, cfg.scaling.gpu_share, cfg.scaling.cpus_per_worker) == (True, 0.25, 2)
    cfg.validate(sources)

    # Ray's own account while the sweep runs: the least GPU left free at any moment
    least_free = [1.0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            least_free[0] = min(least_free[0], ray.available_resources().get("GPU", 0.0))
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        best = run_sweep(cfg, str(space), "packed", samples=4, max_concurrent=None)
    finally:
        done.set()
        watcher.join()
    out = capsys.readouterr().out
    assert "4 at a time" in out, out  # 1 GPU / 0.25 per trial, 8 CPUs / 2 per trial
    assert "the probe on a GPU share found no CUDA device" in out, out
    # four shares of 0.25 held at once: the whole declared GPU
    assert least_free[0] == pytest.approx(0.0, abs=1e-6), least_free

    trials = _results(tmp_path / "exp" / "packed")
    assert len(trials) == 4 == len(best["trials"])
    intervals = []
    for rows in trials.values():
        # given a GPU share, trained on the CPU: no peak GPU memory in its results
        assert {r["device"] for r in rows} == {"cpu"}, rows
        assert all("gpu_memory_peak_bytes" not in r for r in rows)
        first = rows[0]
        # from the trial's start (startup_seconds before its first step) to its last epoch's end
        start = first["epoch_ended_at"] - first["epoch_seconds"] - first["startup_seconds"]
        intervals.append((start, rows[-1]["epoch_ended_at"]))
    # the four trials ran at once: the last to start started before the first to end ended
    assert max(s for s, _ in intervals) < min(e for _, e in intervals), intervals

    # each worker said once, in its own log, that it trains on the CPU
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    assert len(workers) == 4, workers
    for worker in workers:
        text = "".join(get_log(actor_id=worker.actor_id, suffix="out", tail=-1))
        assert text.count("but torch sees no CUDA device here") == 1, text
