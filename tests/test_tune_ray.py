"""Ray Tune + Optuna sweeps on a real local Ray, with storage on a moto S3 server over HTTP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest

from raypose.tune import make_scheduler, run_sweep
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


@pytest.mark.slow
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
    for t in study.trials:
        assert ("pretrain_share" in t.params) == (t.params["schedule"] == "pretrain")
    # the first trial is the enqueued paper settings; ASHA's stops are PRUNED, never FAIL
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == {"lrn_alpha": 0.0025, "lrn_beta": 0.75, "schedule": "joint",
                            "lambda": 1.0, "lr": 3e-4}
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

    # the trials ran without Ray's placement-group cleaner and Tune's queue actor (a process per
    # trial each): the sweep's driver removed the groups of trials that ASHA stopped, and none is
    # left reserved
    import ray
    from ray.util.state import list_actors

    from raypose.trainer import actor_placement_groups

    classes = [a.class_name for a in list_actors(limit=10000)]
    assert classes.count("TrainController") == 4 and "PlacementGroupCleaner" not in classes
    assert "_QueueActor" not in classes  # reports reach Tune through raypose's relay
    assert actor_placement_groups() == []
    assert ray.available_resources().get("CPU") == 2.0


def _experiment_state(exp_dir: Path):
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in data["trial_data"]}


@pytest.mark.slow
def test_resume_after_driver_killed(ray_local, tiny_data, tmp_path):
    """The sweep's driver dies after a trial has finished; the same command again completes the
    sweep without running the finished trial again: with `--resume auto` (what the cluster files
    submit), the first run starts the sweep and the second continues it."""
    storage_dir = tmp_path / "exp"
    args = ["--space", SMOKE, "--data", str(tiny_data), "--storage", str(storage_dir),
            "--name", "killed", "--samples", "3", "--epochs", "2", "--workers-per-trial", "2",
            "--max-concurrent", "1", "--set", "data.batch_size=8", "--resume", "auto",
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
    assert "--resume auto: no sweep 'killed'" in out and "starting it" in out, out[-3000:]
    done_trial = finished[0]
    done_run = exp_dir / "train" / done_trial
    before = sorted(p.name for p in done_run.glob("epoch_*"))
    stamps = {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")}

    resumed = subprocess.run([sys.executable, "-m", "raypose.cli", "tune", *args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "--resume auto: continuing the sweep 'killed'" in resumed.stdout
    states = _experiment_state(exp_dir)
    assert len(states) == 3 and set(states.values()) == {"TERMINATED"}, states
    # the finished trial was not run again: its checkpoints are the same files
    assert sorted(p.name for p in done_run.glob("epoch_*")) == before
    assert {p.name: p.stat().st_mtime for p in done_run.glob("epoch_*")} == stamps
    best = json.loads((exp_dir / "best.json").read_text())
    assert len(best["trials"]) == 3


def scripted_trial(config):
    """A Tune function that reports a fixed script of results (no training), to test how the
    scheduler judges them. Each step is (has a regression head, val_mpjpe); best_val_mpjpe is the
    running minimum over steps with a head, and the mean-pose baseline (5000 mm here) without."""
    from ray import tune

    scripts = {
        # joint training, improving
        "good": [(True, v) for v in (100.0, 90.0, 80.0, 70.0, 60.0, 50.0)],
        # pretrain: three detection epochs with no regression head (val_mpjpe is the mean-pose
        # baseline, far worse than anything else), then a regression stage better than "good"
        "pretrain_good": [(False, 5000.0)] * 3 + [(True, 65.0), (True, 60.0), (True, 45.0)],
        # the same, with a regression stage clearly worse than "good" at equal epochs
        "pretrain_bad": [(False, 5000.0)] * 3 + [(True, 900.0), (True, 890.0), (True, 880.0)],
        # joint training, clearly bad
        "bad": [(True, v) for v in (1000.0, 990.0, 980.0, 970.0, 960.0, 950.0)],
        "worse": [(True, v) for v in (2000.0, 1990.0, 1980.0, 1970.0, 1960.0, 1950.0)],
    }
    best = None
    script = scripts[config["kind"]]
    for epoch, (has_head, value) in enumerate(script, start=1):
        if has_head:
            best = value if best is None else min(best, value)
        tune.report({"epoch": epoch, "epochs_planned": len(script), "has_regression_head": has_head,
                     "val_mpjpe": value, "best_val_mpjpe": best if has_head else 5000.0})


def test_asha_compares_at_equal_epochs_and_never_judges_a_detection_stage(ray_local, tmp_path):
    """Rungs at epochs 1, 2 and 4. A bad joint trial stops at rung 1. Pretrain trials report
    5000 mm for three detection epochs and are not stopped there; they are first judged at rung 4
    against the joint trial's epoch 4: the good one runs to the end, the bad one stops at 4."""
    from ray import tune

    tuner = tune.Tuner(
        scripted_trial,
        param_space={"kind": tune.grid_search(["good", "pretrain_good", "pretrain_bad", "bad"])},
        tune_config=tune.TuneConfig(scheduler=make_scheduler(max_epochs=6), max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    grid = tuner.fit()
    reported = {r.config["kind"]: len(r.metrics_dataframe) for r in grid}
    assert reported == {"good": 6, "pretrain_good": 6, "pretrain_bad": 4, "bad": 1}


def test_asha_never_stops_the_paper_settings_trial(ray_local, tmp_path):
    """The reference (paper-settings) trial runs every epoch even when it is bad ("bad" stops at
    rung 1 in the test above), and its results still count: "worse" is cut at rung 1."""
    from ray import tune

    tuner = tune.Tuner(
        scripted_trial,
        param_space={"kind": tune.grid_search(["good", "bad", "worse"])},
        tune_config=tune.TuneConfig(scheduler=make_scheduler(max_epochs=6, reference={"kind": "bad"}),
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha_ref", verbose=0),
    )
    grid = tuner.fit()
    reported = {r.config["kind"]: len(r.metrics_dataframe) for r in grid}
    assert reported == {"good": 6, "bad": 6, "worse": 1}


def lr_scripted_trial(config):
    """Scripted results whose quality depends on the learning rate only: best at lr = 3e-4 (the
    base config's default, which the paper-settings trial takes); pretrain trials report two
    detection epochs without a head first."""
    import math

    from ray import tune

    distance = abs(math.log10(config["lr"] / 3e-4))  # 0 for the paper-settings trial
    pretrain = config.get("schedule") == "pretrain"
    best = None
    for epoch in range(1, 5):
        has_head = not (pretrain and epoch <= 2)
        value = (100.0 + 400.0 * distance) * (1.0 - 0.1 * epoch) if has_head else 5000.0
        if has_head:
            best = value if best is None else min(best, value)
        tune.report({"epoch": epoch, "epochs_planned": 4, "has_regression_head": has_head,
                     "val_mpjpe": value, "best_val_mpjpe": best if has_head else 5000.0})


def test_optuna_records_paper_trial_pruned_trials_and_no_detection_epochs(ray_local, tmp_path):
    """The real OptunaSearch subclass and ASHA inside Tune, on scripted results: the first trial
    is the enqueued paper settings; trials ASHA stops are PRUNED with their last best_val_mpjpe
    as value; completed ones carry their final best; no detection epoch reaches the study."""
    import optuna
    from ray import tune

    from raypose.config import Config
    from raypose.search_space import parse_space
    from raypose.tune import make_searcher, paper_defaults_point

    space = parse_space({"parameters": {
        "schedule": {"distribution": "categorical", "choices": ["joint", "pretrain"]},
        "lambda": {"distribution": "loguniform", "low": 1.0e-5, "high": 1.0,
                   "condition": {"schedule": "joint"}},
        "lr": {"distribution": "loguniform", "low": 1.0e-5, "high": 1.0e-2},
    }}, "test space")
    point, missing = paper_defaults_point(space, Config())
    assert point == {"schedule": "joint", "lambda": 1.0, "lr": 3e-4}
    assert missing == []  # the base config's LRN settings are the paper's
    # a space without lambda cannot express the paper's lambda = 1 (the base config has 1e-4)
    no_lambda = parse_space({"parameters": {"lr": {"distribution": "loguniform", "low": 1.0e-5,
                                                   "high": 1.0e-2}}}, "test space")
    assert paper_defaults_point(no_lambda, Config()) == ({"lr": 3e-4}, ["loss.detection_weight"])
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tuner = tune.Tuner(
        lr_scripted_trial,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, 0, url, "scripted", points_to_evaluate=[point], samples=6),
            scheduler=make_scheduler(max_epochs=4), num_samples=6, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="optuna", verbose=0),
    )
    tuner.fit()
    study = optuna.load_study(study_name="scripted", storage=url)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 6
    paper = trials[0]
    assert paper.params == point and paper.state.name == "COMPLETE"
    assert paper.value == pytest.approx(100.0 * 0.6)  # its best, at epoch 4
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "PRUNED" in states
    for t in trials:
        steps = sorted(t.intermediate_values)
        if t.params["schedule"] == "pretrain":
            assert steps and steps[0] == 3  # epochs 1 and 2 had no regression head
        else:
            assert steps[0] == 1
        # the value is the last (best so far) intermediate value, for pruned trials too
        assert t.value == pytest.approx(t.intermediate_values[steps[-1]])
        if t.state.name == "PRUNED":
            assert steps[-1] < 4


def test_searcher_state_reopens_the_study_where_this_machine_keeps_it(tmp_path, monkeypatch):
    """A sweep resumed on a machine where the starting machine's study path cannot exist: the
    searcher Tune restores (pickled in tuner.pkl, saved with the experiment state) re-opens the
    study copied to this machine, with its running trial, and tells it the trial's result."""
    import shutil

    from ray import cloudpickle  # what Tune pickles the searcher with
    import optuna

    from raypose.search_space import parse_space
    from raypose.tune import STUDY_URL_ENV, make_searcher

    space = parse_space({"parameters": {"lr": {"distribution": "loguniform", "low": 1.0e-5,
                                               "high": 1.0e-2}}}, "test space")
    first = tmp_path / "first-machine" / "optuna.db"
    searcher = make_searcher(space, 0, f"sqlite:///{first}", "s", samples=3)
    assert searcher.suggest("t1") is not None  # creates Optuna trial 0, still running
    searcher.on_trial_result("t1", {"epoch": 1, "best_val_mpjpe": 120.0})
    pickled = cloudpickle.dumps(searcher)  # as in tuner.pkl
    searcher.save(str(tmp_path / "searcher.pkl"))  # as with the experiment state
    # the fresh machine has only the copy of the study, somewhere else
    second = tmp_path / "second-machine" / "optuna.db"
    second.parent.mkdir()
    shutil.copy(first, second)
    shutil.rmtree(first.parent)
    monkeypatch.setenv(STUDY_URL_ENV, f"sqlite:///{second}")
    restored = cloudpickle.loads(pickled)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert not first.parent.exists()  # nothing was re-created at the old path
    restored.on_trial_result("t1", {"epoch": 2, "best_val_mpjpe": 110.0})
    restored.on_trial_complete("t1", {"epoch": 2, "epochs_planned": 2, "best_val_mpjpe": 110.0})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{second}")
    assert [(t.number, t.state.name, t.value) for t in study.trials] == [(0, "COMPLETE", 110.0)]
    assert study.trials[0].intermediate_values == {1: 120.0, 2: 110.0}
