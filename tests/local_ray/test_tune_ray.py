"""Ray Tune + Optuna sweeps on a real local Ray, with storage on a moto S3 server over HTTP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypose.search.sweep import run_sweep
from tests.support import tiny_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


@pytest.mark.long  # out of .ci/run's time budget: `python -m pytest -m long`
def test_sweep_on_s3(ray_local, tiny_data, s3_bucket, tmp_path, monkeypatch):
    import optuna
    import s3fs

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("RAYPOSE_LOCAL_DIR", str(tmp_path / "local"))
    cfg = tiny_config(tiny_data, f"s3://{bucket}/sweeps")
    best = run_sweep(cfg, SMOKE, "sweep4", samples=4, max_concurrent=1)

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})  # HTTP to 127.0.0.1
    exp = f"{bucket}/sweeps/sweep4"
    stored_best = json.loads(fs.cat(f"{exp}/best.json"))
    assert stored_best["trial_id"] == best["trial_id"]
    assert stored_best["metric"] == "val_mpjpe" and stored_best["value"] > 0
    assert stored_best["checkpoint"].startswith(f"s3://{exp}/train/{best['trial_id']}/epoch_")
    assert fs.exists(stored_best["checkpoint"][len("s3://") :] + "/manifest.json")
    trial_ids = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{exp}/train"))
    assert len(trial_ids) == 4
    for trial_id in trial_ids:  # every trial left at least its latest checkpoint
        assert any(
            p.rsplit("/", 1)[-1].startswith("epoch_") for p in fs.ls(f"{exp}/train/{trial_id}")
        )
    events = fs.glob(f"{exp}/*/events.out.tfevents.*")
    assert len(events) == 4, events  # one TensorBoard event file per trial

    # the Optuna study (SQLite, local; a copy in storage): pretrain_share only on pretrain trials
    local_db = Path(best["study"]["url"][len("sqlite:///") :])
    assert local_db.parent.parent == tmp_path / "local" and local_db.parent.name.endswith("-sweep4")
    assert local_db.exists()
    assert fs.exists(f"{exp}/optuna.db")
    study = optuna.load_study(study_name="sweep4", storage=f"sqlite:///{local_db}")
    assert len(study.trials) == 4
    for t in study.trials:
        assert ("pretrain_share" in t.params) == (t.params["schedule"] == "pretrain")
    # the first trial is the enqueued paper settings; ASHA's stops are PRUNED, never FAIL
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == {
        "lrn_alpha": 0.0025,
        "lrn_beta": 0.75,
        "schedule": "joint",
        "lambda": 1.0,
        "lr": 3e-4,
    }
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    paper = stored_best["paper_defaults"]
    assert paper["params"] == first.params and paper["not_searched"] == []
    rows = {r["trial_id"]: r for r in stored_best["trials"]}
    assert rows[paper["trial_id"]]["is_paper_defaults"]
    assert sum(r["is_paper_defaults"] for r in rows.values()) == 1
    for t in study.trials:  # Optuna's value is the one best.json holds for that trial
        row = next(r for r in rows.values() if r["params"] == t.params)
        assert t.value == pytest.approx(row["best_val_mpjpe"])
        assert row["state"] == t.state.name
    assert stored_best["value"] == min(r["best_val_mpjpe"] for r in rows.values())
    assert 0 < best["share_in_epochs"] <= 1

    # every trial was a Ray Train run with Ray's own cleanup: once the sweep is over, no
    # placement group holds a CPU
    import ray

    from tests.support import wait_until

    wait_until(lambda: ray.available_resources().get("CPU") == 2.0, 60, "both CPUs free")


def _experiment_state(exp_dir: Path):
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in data["trial_data"]}


@pytest.mark.long  # out of .ci/run's time budget: `python -m pytest -m long`
def test_resume_after_driver_killed(ray_local, tiny_data, tmp_path):
    """The sweep's driver dies after a trial has finished; the same command again completes the
    sweep without running the finished trial again: with `--resume auto` (what the cluster files
    submit), the first run starts the sweep and the second continues it."""
    storage_dir = tmp_path / "exp"
    args = [
        "--space",
        SMOKE,
        "--data",
        str(tiny_data),
        "--storage",
        str(storage_dir),
        "--name",
        "killed",
        "--samples",
        "3",
        "--epochs",
        "2",
        "--workers-per-trial",
        "2",
        "--max-concurrent",
        "1",
        "--set",
        "data.batch_size=8",
        "--resume",
        "auto",
        "--address",
        ray_local.get_runtime_context().gcs_address,
    ]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "raypose.cli", "tune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    exp_dir = storage_dir / "killed"
    deadline = time.time() + 300
    finished = []
    try:
        while time.time() < deadline and driver.poll() is None:
            states = _experiment_state(exp_dir)
            finished = [t for t, s in states.items() if s == "TERMINATED"]
            if finished and any(s == "RUNNING" for s in states.values()):
                break
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        out = driver.communicate()[0]
    assert finished, f"no trial finished before the deadline:\n{out[-3000:]}"
    assert "--resume auto: no sweep 'killed'" in out and "starting it" in out, out[-3000:]
    done_trial = finished[0]
    done_run = exp_dir / "train" / done_trial
    before = sorted(p.name for p in done_run.glob("epoch_*"))
    stamps = {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")}

    resumed = subprocess.run(
        [sys.executable, "-m", "raypose.cli", "tune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "--resume auto: continuing the sweep 'killed'" in resumed.stdout
    states = _experiment_state(exp_dir)
    assert len(states) == 3 and set(states.values()) == {"TERMINATED"}, states
    # the finished trial was not run again: its checkpoints are the same files
    assert sorted(p.name for p in done_run.glob("epoch_*")) == before
    assert {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")} == stamps
    best = json.loads((exp_dir / "best.json").read_text())
    assert len(best["trials"]) == 3
