"""Ctrl-C and SIGTERM stop a run or a sweep within seconds, leave no Ray process and no
unrecorded checkpoint folder behind, and the same command resumes from the last recorded epoch.

Each test runs `raypose` as a user does: its own process (in a process group of its own, as a
terminal's foreground job), starting its own local Ray instance, and signals the whole group,
as Ctrl-C in a terminal does."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")
STOP_WITHIN_S = 10  # the bound; it measured 1.5-3 s on this 2-core machine


class Raypose:
    """`raypose ARGS` in a new process group; its output is collected while it runs."""

    def __init__(self, *args, env=None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # -X faulthandler: a process that does not stop is sent SIGABRT, which prints where each
        # of its threads was
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "raypose.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.out = ""

    def read(self):
        chunk = self.proc.stdout.read()
        if chunk:
            self.out += chunk.decode(errors="replace")
        return self.out

    def wait_for(self, text: str, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if text in self.read():
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen within {timeout} s:\n{self.read()[-3000:]}")

    def descendants(self):
        return psutil.Process(self.proc.pid).children(recursive=True)

    def interrupt(self, sig=signal.SIGINT, group=True) -> float:
        """Signal the whole process group (Ctrl-C), or the process alone; the seconds until the
        process ended."""
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        start = time.time()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            time.sleep(2)
            raise AssertionError(
                f"still running 60 s after the signal:\n{self.read()[-12000:]}"
            ) from None
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.read()
        return time.time() - start


def _no_process_left(processes):
    _, alive = psutil.wait_procs(processes, timeout=5)
    return [(p.pid, " ".join(p.cmdline()[:3])) for p in alive if p.is_running()]


def _train_args(data, storage, name, epochs):
    return [
        "train",
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--name",
        name,
        "--epochs",
        str(epochs),
        "--workers",
        "1",
        "--set",
        "data.batch_size=8",
    ]


@pytest.mark.slow
def test_a_run_stops_mid_epoch_and_resumes_from_its_last_recorded_epoch(tiny_data, tmp_path):
    run = tmp_path / "runs" / "r"
    train = Raypose(*_train_args(tiny_data, tmp_path / "runs", "r", 200))
    train.wait_for("epoch 3/200", 180)
    # the same run started again meanwhile is refused in one line, before it starts Ray
    second = subprocess.run(
        [sys.executable, "-m", "raypose.cli", *_train_args(tiny_data, tmp_path / "runs", "r", 200)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Ray's own log lines" not in second.stdout  # Ray was never started
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "'r' under" in lines[0] and "is already running" in lines[0], lines
    ray_processes = train.descendants()
    assert ray_processes  # the local Ray instance this run started
    took = train.interrupt()
    assert train.proc.returncode == 130, train.out[-3000:]
    assert took < STOP_WITHIN_S, (took, train.out[-2000:])
    assert "run r stopped: its last recorded checkpoint is epoch_" in train.out, train.out[-2000:]
    assert train.out.rstrip().endswith("raypose train: interrupted")
    assert "Traceback" not in train.out
    assert _no_process_left(ray_processes) == []
    assert not list((tmp_path / "runs" / ".raypose-locks").iterdir())  # the lock was released
    # every checkpoint folder left is one Ray Train recorded; the latest is the one it resumes from
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    folders = sorted(p.name for p in run.glob("epoch_*"))
    assert folders and all(name in json.dumps(snapshot) for name in folders), (folders, snapshot)
    last = int(folders[-1].split("_")[1])
    assert f"its last recorded checkpoint is epoch_{last:04d}" in train.out
    assert last >= 1  # uploads and records run behind the printed epoch line

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "raypose.cli",
            *_train_args(tiny_data, tmp_path / "runs", "r", last + 1),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    epochs = [line for line in resumed.stdout.splitlines() if "] epoch " in line]
    assert len(epochs) == 1 and f"epoch {last + 1}/{last + 1}" in epochs[0], resumed.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_run_stops_during_start_up(ray_local, tiny_data, tmp_path, sig, request):
    """Ctrl-C reaches the whole process group (the local Ray instance too) while Ray starts;
    SIGTERM (`kill`, Kubernetes) reaches the raypose process alone, once Ray is up and the run's
    workers are starting. Another Ray instance runs on the host (this test process's), and a
    `ray start` whose head died left its address file in Ray's temporary folder: a run without
    --address starts its own instance all the same, and joins neither."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))  # Ray's socket paths stay short
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    (ray_tmp / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
    train = Raypose(
        *_train_args(tiny_data, tmp_path / "runs", "r", 200), env={"RAY_TMPDIR": str(ray_tmp)}
    )
    if sig == signal.SIGINT:
        train.wait_for("Ray's own log lines", 120)  # Ray is starting
        time.sleep(1.0)
    else:
        train.wait_for("node check", 120)
    ray_processes = train.descendants()
    if sig == signal.SIGTERM:  # Ray is up: its own instance, not this process's
        assert any("gcs_server" in " ".join(p.cmdline()) for p in ray_processes), train.out[-2000:]
    took = train.interrupt(sig, group=sig == signal.SIGINT)
    assert train.proc.returncode == 130, train.out[-3000:]
    assert took < STOP_WITHIN_S, (took, train.out[-2000:])
    assert "] epoch " not in train.out and "Traceback" not in train.out, train.out[-3000:]
    assert train.out.rstrip().endswith("raypose train: interrupted")
    assert _no_process_left(ray_processes) == []


class Planted:
    """A pickle whose loading writes a marker file (what an attacker's os.system would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.slow
def test_a_sweep_stops_resumes_and_never_loads_a_planted_pickle(tiny_data, tmp_path):
    """Ctrl-C mid-sweep; then a pickle planted as Tune's tuner.pkl makes `--resume` refuse in one
    line (exit 2) without loading it (raypose.storage.seal); with Tune's own file back, the resume runs
    the trial's remaining epoch."""
    args = [
        "tune",
        "--space",
        SMOKE,
        "--data",
        str(tiny_data),
        "--storage",
        str(tmp_path / "exp"),
        "--name",
        "s",
        "--samples",
        "1",
        "--epochs",
        "2",
        "--workers-per-trial",
        "1",
        "--set",
        "data.batch_size=8",
    ]
    exp = tmp_path / "exp" / "s"
    sweep = Raypose(*args)
    sweep.wait_for("epoch 1/2", 240)
    ray_processes = sweep.descendants()
    took = sweep.interrupt()
    assert sweep.proc.returncode == 130, sweep.out[-3000:]
    assert took < STOP_WITHIN_S, (took, sweep.out[-2000:])
    assert "sweep s stopped" in sweep.out and "--resume continues it" in sweep.out, sweep.out[
        -3000:
    ]
    assert "Traceback" not in sweep.out
    assert _no_process_left(ray_processes) == []
    for run in (exp / "train").iterdir():  # only recorded folders are left
        record = run / "checkpoint_manager_snapshot.json"
        text = record.read_text() if record.exists() else ""
        assert all(p.name in text for p in run.glob("epoch_*")), run

    marker = tmp_path / "marker"
    original = (exp / "tuner.pkl").read_bytes()
    assert (exp / "tuner.pkl.raypose-seal").exists()
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    refused = subprocess.run(
        [sys.executable, "-m", "raypose.cli", *args, "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to read" in lines[0] and "tuner.pkl" in lines[0], lines
    assert "Ray's own log lines" not in refused.stdout  # refused before Ray started
    assert not marker.exists()

    (exp / "tuner.pkl").write_bytes(original)
    resumed = subprocess.run(
        [sys.executable, "-m", "raypose.cli", *args, "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "epoch 2/2" in resumed.stdout, resumed.stdout[-3000:]
    best = json.loads((exp / "best.json").read_text())
    assert len(best["trials"]) == 1 and best["trials"][0]["epochs"] == 2
    assert not marker.exists()
