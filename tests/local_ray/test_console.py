"""What a person sees: the sweep's lines (per epoch, per trial, a progress bar with an estimate)
and Ray's own output routed to the log file."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raypose import console
from raypose.search.sweep import METRIC, judged

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def result(epoch, value, planned=2, head=True, stage="joint"):
    return {
        "epoch": epoch,
        "epochs_planned": planned,
        "has_regression_head": head,
        "stage": stage,
        "train_loss": 0.5,
        "val_mpjpe": value,
        METRIC: value,
        "val_mean_pose_mpjpe": 250.0,
        "samples_per_s": 20.0,
    }


def test_sweep_lines_each_once_with_best_and_time_left():
    out, clock = io.StringIO(), Clock()
    state = console.SweepProgressState(4, 2, METRIC, judged, out=out, clock=clock)
    state.started("a", {"lr": 0.0003, "schedule": "joint"})
    state.started("b", {"lr": 0.001, "schedule": "pretrain"})
    clock.now += 50
    state.result("a", result(1, 200.0))
    state.result("a", result(1, 200.0))  # a restored trial reporting epoch 1 again: no new line
    state.result("b", result(1, 250.0, head=False, stage="detection"))
    clock.now += 50
    state.result("a", result(2, 180.0))
    state.ended("a", "finished", 180.0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[raypose] trial 1/4 a started: lr=0.0003 schedule=joint"
    assert lines[1] == "[raypose] trial 2/4 b started: lr=0.001 schedule=pretrain"
    # one line per epoch per trial, each once
    epoch_lines = [line for line in lines if " epoch " in line]
    assert len(epoch_lines) == 3
    assert (
        "trial 1/4 a epoch 1/2 joint" in epoch_lines[0] and "val_mpjpe 200.0 mm" in epoch_lines[0]
    )
    # a detection-stage result is not a pose error and never becomes the best
    assert "no regression head yet" in epoch_lines[1]
    assert lines[-2] == "[raypose] trial 1/4 a finished after 2 epoch(s), best val_mpjpe 180.0 mm"
    # 3 epochs took 100 s; left: trial b 1 more epoch (finished trials averaged 2), 2 pending
    # trials of 2 epochs -> 5 epochs at 100/3 s each = 166.7 s
    assert lines[-1] == (
        "[raypose] sweep [#####---------------] 1/4 trials done · 1 running · "
        "best val_mpjpe 180.0 mm (trial 1) · 1 min 40 s so far · about 2 min 47 s left"
    )
    assert state.seconds_left() == pytest.approx(5 * 100 / 3)


def test_no_estimate_before_an_epoch_and_none_at_the_end():
    out, clock = io.StringIO(), Clock()
    state = console.SweepProgressState(1, 3, METRIC, judged, out=out, clock=clock)
    assert state.seconds_left() is None
    assert "left" not in state.progress_line() and "no judged result yet" in state.progress_line()
    state.result("t", result(1, 90.0, planned=3))
    clock.now += 30
    state.ended("t", "stopped early", 90.0)
    last = out.getvalue().splitlines()[-1]
    assert "1/1 trials done" in last and "left" not in last and "[####################]" in last


def test_duration_format():
    assert console.duration(59.4) == "59 s"
    assert console.duration(61) == "1 min 01 s"
    assert console.duration(3 * 3600 + 5 * 60) == "3 h 05 min"


def test_libraries_log_to_the_file_not_the_terminal(tmp_path, monkeypatch, capfd):
    """A warning from a Ray logger (as ray.init's token-auth warning) and an Optuna record go to
    the log file only; the root logger's state is restored afterwards for the other tests."""
    monkeypatch.setenv("RAYPOSE_LOG_DIR", str(tmp_path))
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    saved = (console._State.log_file, console._State.log_path)
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    ray_logger = logging.getLogger("ray")
    saved_ray = (list(ray_logger.handlers), ray_logger.propagate)
    console._State.log_file = None
    try:
        path = console.open_log("unit")
        # what ray.init does to the "ray" logger: no handler, no propagation
        ray_logger.handlers, ray_logger.propagate = [], False
        console.route_loggers()
        logging.getLogger("ray._private.some_module").warning("token auth is on")
        # WARNING: other tests may have set Optuna's verbosity above INFO
        logging.getLogger("optuna.storages").warning("a new study created")
        console.say("[raypose] a line of our own")
        console._State.log_file.flush()
        captured = capfd.readouterr()
        assert captured.out == "[raypose] a line of our own\n"
        assert captured.err == ""
        text = Path(path).read_text()
        assert "WARNING ray._private.some_module: token auth is on" in text
        assert "WARNING optuna.storages: a new study created" in text
    finally:
        console._State.log_file.close()
        console._State.log_file, console._State.log_path = saved
        root.handlers, root.level = saved_root
        ray_logger.handlers, ray_logger.propagate = saved_ray
        logging.captureWarnings(False)


@pytest.mark.slow
def test_sweep_output_is_one_line_per_epoch_per_trial(tiny_data, tmp_path):
    """A real `raypose tune` in a subprocess: stdout holds the sweep's own lines, each epoch line
    once per trial, and none of Ray's or Tune's records; the log file whose path is printed
    holds them."""
    env = dict(os.environ, RAYPOSE_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))
    env.pop(console.VERBOSE_ENV, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raypose.cli",
            "tune",
            "--space",
            str(REPO / "search_spaces" / "smoke.yaml"),
            "--data",
            str(tiny_data),
            "--storage",
            str(tmp_path / "exp"),
            "--name",
            "quiet",
            "--samples",
            "2",
            "--max-concurrent",
            "1",
            "--set",
            "schedule.epochs=2",
            "--set",
            "data.batch_size=8",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    epoch_lines = [
        line for line in lines if " epoch " in line and line.startswith("[raypose] trial")
    ]
    assert (
        len(epoch_lines) == len(set(epoch_lines)) >= 3
    )  # 2 trials, ASHA may stop one after 1 epoch
    for noise in (
        "Reporting training result",
        "Configuration for experiment",
        "Trial status",
        "(RayTrainWorker",
        "(TrainController",
        "Token authentication",
        "A new study",
    ):
        assert noise not in proc.stdout + proc.stderr, noise
    assert sum("trials done" in line for line in lines) == 2  # one progress line per trial
    log_line = next(line for line in lines if line.startswith("[raypose] Ray's own log lines: "))
    log = Path(log_line.split(": ", 1)[1].split(" (")[0]).read_text()
    assert "Started a local Ray instance" in log  # Ray's own records
    # the workers' own output stays in Ray's worker logs (ray.init(log_to_driver=False))
    assert "[raypose] epoch 1/2" not in log


def say_lines(lines, texts):
    """A Ray task standing in for a run's rank 0 worker."""
    for text in texts:
        console.worker_say(lines, text)


def test_worker_lines_reach_the_terminal_once_in_order(ray_local, capsys, monkeypatch):
    """A LineRelay prints what a worker sends it, once each and in order, including what was sent
    just before the run ended; the worker's own output keeps the lines too."""
    monkeypatch.setattr(console._State, "terminal", None)
    texts = [f"[raypose] epoch {k}/3 joint: loss 0.5" for k in (1, 2, 3)]
    with console.LineRelay() as relay:
        task = ray_local.remote(num_cpus=0)(say_lines)
        ray_local.get(task.remote(relay.handle, texts[:2]))
        ray_local.get(task.remote(relay.handle, texts[2:]))
    assert [line for line in capsys.readouterr().out.splitlines() if line in texts] == texts


def test_sweep_lines_without_validation_and_with_gpu_memory():
    """A trial that holds nothing out (data.val_subjects=[]) says so instead of a score, and a
    trial on a GPU share shows its peak GPU memory."""
    out, clock = io.StringIO(), Clock()
    state = console.SweepProgressState(2, 1, METRIC, judged, out=out, clock=clock)
    state.started("a", {"data.actions": "walk"})
    no_validation = {
        k: v for k, v in result(1, 0.0, planned=1).items() if k not in ("val_mpjpe", METRIC)
    }
    no_validation["val_mean_pose_mpjpe"] = None
    state.result("a", {**no_validation, "gpu_memory_peak_bytes": 1.5e9})
    line = out.getvalue().splitlines()[-1]
    assert line == (
        "[raypose] trial 1/2 a epoch 1/1 joint: loss 0.5000  no validation split  "
        "20.0 samples/s  peak GPU memory 1.50 GB"
    )
