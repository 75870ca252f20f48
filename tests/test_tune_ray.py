"""Ray Tune + Optuna sweeps on a real local Ray, with storage on a moto S3 server over HTTP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from raypose.tune import make_scheduler, run_sweep
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


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
    assert fs.exists(stored_best["checkpoint"][len("s3://"):] + "/manifest.json")
    trial_ids = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{exp}/train"))
    assert len(trial_ids) == 4
    for trial_id in trial_ids:  # every trial left at least its latest checkpoint
        assert any(p.rsplit("/", 1)[-1].startswith("epoch_") for p in fs.ls(f"{exp}/train/{trial_id}"))
    events = fs.glob(f"{exp}/*/events.out.tfevents.*")
    assert len(events) == 4, events  # one TensorBoard event file per trial

    # the Optuna study (SQLite, local; a copy in storage): pretrain_share only on pretrain trials
    local_db = Path(best["study"]["url"][len("sqlite:///"):])
    assert local_db.parent.parent == tmp_path / "local" and local_db.parent.name.endswith("-sweep4")
    assert local_db.exists()
    assert fs.exists(f"{exp}/optuna.db")
    study = optuna.load_study(study_name="sweep4", storage=f"sqlite:///{local_db}")
    assert len(study.trials) == 4
    kinds = [t.params["schedule"] for t in study.trials]
    assert set(kinds) == {"joint", "pretrain"}  # seed 0 draws both
    for t in study.trials:
        assert ("pretrain_share" in t.params) == (t.params["schedule"] == "pretrain")
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert 0 < best["share_in_epochs"] <= 1


def _experiment_state(exp_dir: Path):
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in data["trial_data"]}


def test_resume_after_driver_killed(ray_local, tiny_data, tmp_path):
    """The sweep's driver dies after a trial has finished; --resume completes the sweep without
    running the finished trial again."""
    storage_dir = tmp_path / "exp"
    args = ["--space", SMOKE, "--data", str(tiny_data), "--storage", str(storage_dir),
            "--name", "killed", "--samples", "3", "--epochs", "2", "--workers-per-trial", "2",
            "--max-concurrent", "1", "--set", "data.batch_size=8",
            "--address", ray_local.get_runtime_context().gcs_address]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "raypose.cli", "tune", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
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
    done_trial = finished[0]
    done_run = exp_dir / "train" / done_trial
    before = sorted(p.name for p in done_run.glob("epoch_*"))
    stamps = {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")}

    resumed = subprocess.run([sys.executable, "-m", "raypose.cli", "tune", *args, "--resume"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    states = _experiment_state(exp_dir)
    assert len(states) == 3 and set(states.values()) == {"TERMINATED"}, states
    # the finished trial was not run again: its checkpoints are the same files
    assert sorted(p.name for p in done_run.glob("epoch_*")) == before
    assert {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")} == stamps
    best = json.loads((exp_dir / "best.json").read_text())
    assert len(best["trials"]) == 3


def scripted_trial(config):
    """A Tune function that reports a fixed script of results (no training), to test how the
    scheduler judges them."""
    from ray import tune

    scripts = {
        # joint training, improving
        "good": [(1, True, 100.0), (2, True, 90.0), (3, True, 80.0), (4, True, 70.0)],
        # pretrain: three detection epochs with no regression head (val_mpjpe is the mean-pose
        # baseline, far worse than anything else), then a good regression stage
        "pretrain": [(0, False, 5000.0), (0, False, 5000.0), (0, False, 5000.0),
                     (1, True, 85.0), (2, True, 75.0)],
        # joint training, clearly bad
        "bad": [(1, True, 1000.0), (2, True, 990.0), (3, True, 980.0), (4, True, 970.0)],
    }
    for epoch, (regression_epochs, has_head, value) in enumerate(scripts[config["kind"]], start=1):
        tune.report({"epoch": epoch, "regression_epochs": regression_epochs,
                     "has_regression_head": has_head, "val_mpjpe": value})


def test_asha_stops_bad_trial_but_not_pretrain_detection_stage(ray_local, tmp_path):
    from ray import tune

    tuner = tune.Tuner(
        scripted_trial,
        param_space={"kind": tune.grid_search(["good", "pretrain", "bad"])},
        tune_config=tune.TuneConfig(scheduler=make_scheduler(max_epochs=4), max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    grid = tuner.fit()
    reported = {r.config["kind"]: len(r.metrics_dataframe) for r in grid}
    assert reported["good"] == 4
    assert reported["pretrain"] == 5  # never stopped, although its detection epochs report 5000 mm
    assert reported["bad"] == 1  # stopped at the first rung
