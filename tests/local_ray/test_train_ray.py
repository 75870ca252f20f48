"""Ray Train integration: real local Ray, real moto S3 server over HTTP, real HDF5 files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from raypose import storage
from raypose.cluster.driver import preflight
from raypose.config import ConfigError
from raypose.storage import checkpoint
from raypose.train.run import build_trainer, run_training
from tests.support import tiny_config


class EpochRecorder:
    """A Ray Train UserCallback that appends each reported epoch to a file (it runs in the
    controller actor, not in the test process)."""

    def __new__(cls, path):
        import ray.train

        class _Recorder(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                # metrics: one dict per rank
                with open(path, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "epoch": metrics[0]["epoch"],
                                "stage": metrics[0]["stage"],
                                "checkpoint": checkpoint is not None,
                                "val_mpjpe": metrics[0]["val_mpjpe"],
                                "startup_seconds": metrics[0]["startup_seconds"],
                                "train_loss": [m["train_loss"] for m in metrics],
                            }
                        )
                        + "\n"
                    )

        return _Recorder()


def recorded(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.mark.smoke
def test_two_workers_checkpoints_in_s3(ray_local, tiny_data, s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = tiny_config(tiny_data, f"s3://{bucket}/exp", name="s3run")
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["epoch"] == 2
    assert result.metrics["val_mpjpe"] > 0
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})  # over HTTP to 127.0.0.1
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/exp/s3run", refresh=True))
    assert "epoch_0001" in names and "epoch_0002" in names
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/exp/s3run/epoch_0002"))
    assert files == sorted(checkpoint.PAYLOAD_FILES + (checkpoint.MANIFEST_FILE,))
    state = json.loads(fs.cat(f"{bucket}/exp/s3run/epoch_0002/state.json"))
    assert state["epoch"] == 2 and state["stage"] == "joint"
    stored_cfg = json.loads(fs.cat(f"{bucket}/exp/s3run/epoch_0002/config.json"))
    assert stored_cfg["scaling"]["workers"] == 2
    # no credential ever lands in storage
    for name in files:
        assert b"testing" not in fs.cat(f"{bucket}/exp/s3run/epoch_0002/{name}")


def _spool_folder_of_an_ended_process() -> str:
    """A spool folder with a file in it, left by a process that has exited (as a worker killed
    during its upload leaves one)."""
    code = (
        "from raypose.storage import checkpoint; d = checkpoint.new_spool_dir(); "
        "open(d + '/model.pt', 'wb').write(bytes(4096)); print(d)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_local_path_and_pretrain_stages(ray_local, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data,
        tmp_path / "exp",
        name="pre",
        schedule__kind="pretrain",
        schedule__epochs=2,
        schedule__pretrain_share=0.5,
    )
    log = tmp_path / "epochs.jsonl"
    orphan = _spool_folder_of_an_ended_process()
    mine = checkpoint.new_spool_dir()  # this process is alive: its folder must stay
    try:
        trainer = build_trainer(cfg, "pre", preflight(cfg), callbacks=[EpochRecorder(str(log))])
        result = trainer.fit()
        # the worker removed the ended process's folder, and Ray deleted each of the run's own
        # folders once it was uploaded: only this process's folder is left
        assert not os.path.exists(orphan)
        assert os.listdir(checkpoint.spool_dir()) == [os.path.basename(mine)]
    finally:
        shutil.rmtree(mine, ignore_errors=True)
    assert result.error is None
    assert [(r["epoch"], r["stage"]) for r in recorded(log)] == [
        (1, "detection"),
        (2, "regression"),
    ]
    assert result.metrics["epoch"] == 2
    # Ray Train recorded both checkpoints that raypose's upload function put in place, in the
    # record that raypose.cluster.driver.latest_checkpoint reads
    from raypose.cluster.ray_internals import CHECKPOINT_RECORD

    assert (tmp_path / "exp" / "pre" / CHECKPOINT_RECORD).is_file()
    assert sorted(os.path.basename(c.path) for c, _ in result.best_checkpoints) == [
        "epoch_0001",
        "epoch_0002",
    ]
    first = checkpoint.load(tmp_path / "exp" / "pre" / "epoch_0001")
    second = checkpoint.load(tmp_path / "exp" / "pre" / "epoch_0002")
    assert first["state"]["heads"] == {"regression": False, "detection": True}
    assert second["state"]["heads"] == {"regression": True, "detection": False}
    assert not any(k.startswith("detection.") for k in second["model"])
    # the regression stage optimised E_r only: no detection loss was reported for it
    assert "train_detection" not in second["state"]["metrics"]
    assert "train_regression" not in first["state"]["metrics"]
    # the detection stage reports the mean-pose baseline as its val_mpjpe (no regression head yet)
    assert (
        first["state"]["metrics"]["val_mpjpe"] == first["state"]["metrics"]["val_mean_pose_mpjpe"]
    )
    assert first["state"]["metrics"]["has_regression_head"] is False
    assert second["state"]["metrics"]["regression_epochs"] == 1


@pytest.mark.slow
def test_stop_and_resume_with_same_name(ray_local, tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data, tmp_path / "exp", name="resume", schedule__epochs=5, storage__checkpoint_every=3
    )
    log = tmp_path / "epochs.jsonl"
    first = build_trainer(
        cfg, "resume", preflight(cfg), callbacks=[EpochRecorder(str(log))], stop_after_epoch=2
    ).fit()
    assert first.error is None and first.metrics["epoch"] == 2
    assert [r["epoch"] for r in recorded(log)] == [1, 2]
    second = build_trainer(cfg, "resume", preflight(cfg), callbacks=[EpochRecorder(str(log))]).fit()
    assert second.error is None
    epochs = recorded(log)
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5]  # resumed at 3, ended at 5
    assert second.metrics["epoch"] == 5
    # checkpoints: every 3rd epoch, at a pause, at the end, and wherever val_mpjpe was the best so far
    best = float("inf")
    for r in epochs:
        assert r["checkpoint"] == (r["val_mpjpe"] < best or r["epoch"] in (2, 3, 5)), epochs
        best = min(best, r["val_mpjpe"])
    # train losses are averaged over both workers: every rank reports the same numbers
    assert all(
        len(r["train_loss"]) == 2 and r["train_loss"][0] == r["train_loss"][1] for r in epochs
    )
    assert all(0 < r["startup_seconds"] < 300 for r in epochs)


def test_resume_refuses_another_config(ray_local, tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "exp", name="r2")
    assert build_trainer(cfg, "r2", preflight(cfg), stop_after_epoch=1).fit().error is None
    other = tiny_config(tiny_data, tmp_path / "exp", name="r2", lrn_alpha=0.01)
    with pytest.raises(ConfigError, match="model.lrn_alpha"):
        preflight(other)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint(ray_local, tiny_data, tmp_path):
    from ray.util.state import list_actors

    cfg = tiny_config(
        tiny_data, tmp_path / "exp", name="ft", schedule__epochs=4, storage__max_failures=2
    )
    log = tmp_path / "epochs.jsonl"
    trainer = build_trainer(cfg, "ft", preflight(cfg), callbacks=[EpochRecorder(str(log))])
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()))
    thread.start()
    deadline = time.time() + 240
    while not recorded(log) and time.time() < deadline:
        time.sleep(0.2)
    assert recorded(log), "no epoch finished in time"
    address = ray_local.get_runtime_context().gcs_address  # this test's instance, not another one
    workers = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    assert len(workers) == 2
    os.kill(workers[1]["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.error is None
    epochs = [r["epoch"] for r in recorded(log)]
    assert epochs[-1] == 4
    all_workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")])
    assert len(all_workers) >= 4, "the worker group was not restarted"
    # the new group resumed from a checkpoint: epoch 1 (done before the kill) never ran again
    assert epochs.count(1) == 1


def test_bad_config_fails_before_ray(tiny_data, tmp_path):
    import ray

    with pytest.raises(ConfigError, match="scaling.workers"):
        tiny_config(tiny_data, tmp_path, scaling__workers=0)
    cfg = tiny_config(tiny_data, "s3://no-such-bucket/x")
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    try:
        with pytest.raises(storage.StorageError, match="unreachable"):
            preflight(cfg)
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    assert not ray.is_initialized()


def test_gpu_flag_without_gpu_fails_before_workers(tiny_data, tmp_path):
    """raypose's own local instance has no autoscaler: what is up is all there is, and it has
    no GPU, so --gpu is refused at once, before any worker starts or anything is written."""
    import ray
    from ray.util.state import list_actors

    from raypose.cluster.driver import init_ray

    cfg = tiny_config(tiny_data, tmp_path / "exp", name="gpu", scaling__gpu=True)
    init_ray(num_cpus=2, command="test")
    try:
        with pytest.raises(
            ConfigError,
            match=r"--workers and --gpu: 2 worker\(s\) of \{CPU: 1, "
            r"GPU: 1\} for the run, but the Ray cluster can never offer that "
            r"\(at most 0 .*no autoscaler",
        ):
            run_training(cfg)
        address = ray.get_runtime_context().gcs_address
        assert list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")]) == []
    finally:
        ray.shutdown()
    assert not (tmp_path / "exp" / "gpu").exists()  # nothing was written for the run


def test_relative_paths_reach_workers_as_absolute(tiny_data, tmp_path, monkeypatch):
    # Tune runs each trial in its own folder: a path relative to the driver would not resolve there
    monkeypatch.chdir(tiny_data.parent)
    (tiny_data.parent / "rel-exp").mkdir(exist_ok=True)
    cfg = tiny_config(tiny_data.name, "rel-exp")
    preflight(cfg)
    assert cfg.data.path == str(tiny_data)
    assert cfg.storage.uri == str(tiny_data.parent / "rel-exp")
