"""An experiment's state lives with the experiment: its Optuna study, the checkpoints Ray Train
keeps and records, and what a resumed sweep applies. Storage is a moto S3 server over HTTP."""

import json
import os
from pathlib import Path

import pytest
import yaml

from raypose import storage
from raypose.cluster.driver import latest_checkpoint, preflight
from raypose.config import ConfigError
from raypose.search.sweep import (
    SWEEP_RECORD,
    default_study_url,
    existing_checkpoint,
    run_sweep,
    sweep_record,
)
from raypose.storage import checkpoint
from raypose.storage import retry as storage_retry
from raypose.train.run import build_trainer
from tests.support import tiny_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


def _s3fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})


# ----------------------------------------------------------------------------------------------
# Where the study lives (no Ray)


def test_study_location_is_per_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPOSE_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    a = default_study_url(storage.parse("s3://bucket-a/sweeps"), "s1")
    b = default_study_url(storage.parse("s3://bucket-b/sweeps"), "s1")
    other_prefix = default_study_url(storage.parse("s3://bucket-a/other"), "s1")
    assert len({a, b, other_prefix}) == 3
    assert a == default_study_url(storage.parse("s3://bucket-a/sweeps/"), "s1")  # same experiment
    assert a.startswith(f"sqlite:///{tmp_path / 'local'}/") and a.endswith("-s1/optuna.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")  # same bucket, another endpoint
    assert default_study_url(storage.parse("s3://bucket-a/sweeps"), "s1") != a
    # local storage: the study is inside the experiment folder itself
    local = storage.parse(str(tmp_path / "exp"))
    assert default_study_url(local, "s1") == f"sqlite:///{tmp_path / 'exp' / 's1' / 'optuna.db'}"


# ----------------------------------------------------------------------------------------------
# best.json names only a checkpoint that exists (moto, no Ray)


def test_best_json_checkpoint_exists(s3_bucket, capsys):
    endpoint, bucket = s3_bucket
    fs = _s3fs(endpoint)
    loc = storage.parse(f"s3://{bucket}/sweeps")
    kept = f"{bucket}/sweeps/s/train/t2/epoch_0002"
    fs.pipe(f"{kept}/{checkpoint.MANIFEST_FILE}", b"{}")
    fs.pipe(f"{bucket}/sweeps/s/train/t1/epoch_0001/{checkpoint.MODEL_FILE}", b"partial")
    rows = [
        # the best value, but its checkpoint is gone (only a partial folder is left)
        {
            "trial_id": "t1",
            "best_val_mpjpe": 100.0,
            "checkpoint_path": f"{bucket}/sweeps/s/train/t1/epoch_0001",
        },
        {"trial_id": "t2", "best_val_mpjpe": 120.0, "checkpoint_path": kept},
        {"trial_id": "t3", "best_val_mpjpe": 130.0, "checkpoint_path": None},
    ]
    assert existing_checkpoint(loc, rows)["trial_id"] == "t2"
    assert "trial t1: its best checkpoint" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no trial's best checkpoint is in storage"):
        existing_checkpoint(loc, [rows[0], rows[2]])


# ----------------------------------------------------------------------------------------------
# Resume reads Ray Train's record (moto, no Ray)


def test_partial_checkpoint_folder_without_record_never_counts(tiny_data, s3_bucket):
    endpoint, bucket = s3_bucket
    fs = _s3fs(endpoint)
    # an upload cut off midway: a folder with a config from another run and no manifest, and no
    # record of any finished checkpoint
    fs.pipe(f"{bucket}/exp/cut/epoch_0001/{checkpoint.CONFIG_FILE}", b'{"model": {"lrn_alpha": 9}}')
    cfg = tiny_config(tiny_data, f"s3://{bucket}/exp", name="cut")
    assert latest_checkpoint(storage.parse(f"s3://{bucket}/exp/cut")) is None
    preflight(cfg)  # neither refused as "another config" nor as "without config.json"


# ----------------------------------------------------------------------------------------------
# What a resume applies and refuses (moto, no Ray)


def test_resume_refuses_what_it_cannot_apply_before_ray(
    tiny_data, s3_bucket, tmp_path, monkeypatch
):
    import ray

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("RAYPOSE_LOCAL_DIR", str(tmp_path / "local"))
    fs = _s3fs(endpoint)
    cfg = tiny_config(tiny_data, f"s3://{bucket}/sweeps", name="s1")
    preflight(cfg)
    loc = storage.parse(cfg.storage.uri)
    study = default_study_url(loc, "s1")
    # a sweep that started with 3 trials, 1 at a time (Tune's state file marks it as existing)
    fs.pipe(f"{bucket}/sweeps/s1/experiment_state-2026.json", b"{}")
    storage.write_text(
        loc.join("s1", SWEEP_RECORD), json.dumps(sweep_record(cfg, SMOKE, 3, 1, study))
    )

    again = tiny_config(tiny_data, f"s3://{bucket}/sweeps", name="s1", lrn_alpha=0.01)
    with pytest.raises(ConfigError) as refused:
        run_sweep(
            again,
            SMOKE,
            "s1",
            samples=8,
            max_concurrent=2,
            resume=True,
            study_url="sqlite:////elsewhere/optuna.db",
        )
    message = str(refused.value)
    assert "\n" not in message
    for part in (
        "--samples 8 (the sweep has 3)",
        "--max-concurrent 2 (the sweep has 1)",
        "--study-db sqlite:////elsewhere/optuna.db",
        "model.lrn_alpha 0.01",
    ):
        assert part in message, message

    other_space = tmp_path / "space.yaml"
    doc = yaml.safe_load(Path(SMOKE).read_text())
    doc["parameters"]["lr"]["high"] *= 1.5  # another range for one parameter
    other_space.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(
        ConfigError, match=r"--space .* \(differs from the space the sweep started with"
    ):
        run_sweep(
            tiny_config(tiny_data, f"s3://{bucket}/sweeps"),
            str(other_space),
            "s1",
            samples=None,
            max_concurrent=None,
            resume=True,
        )
    assert not ray.is_initialized()  # refused before any cluster time


# ----------------------------------------------------------------------------------------------
# Ray: retention, the checkpoint record and two sweeps of one name


@pytest.mark.slow
def test_retention_keeps_regression_checkpoints_and_resume_reads_the_record(
    ray_local, tiny_data, s3_bucket
):
    from ray.train import Result

    endpoint, bucket = s3_bucket
    fs = _s3fs(endpoint)
    cfg = tiny_config(
        tiny_data,
        f"s3://{bucket}/exp",
        name="pre",
        schedule__kind="pretrain",
        schedule__epochs=3,
        schedule__pretrain_share=0.3,
        storage__keep_checkpoints=1,
        scaling__workers=1,
        data__max_train_samples=32,
        data__max_val_samples=16,
    )
    run = f"{bucket}/exp/pre"
    build_trainer(cfg, "pre", preflight(cfg), stop_after_epoch=2).fit()  # detection 1, regression 2
    # the detection-stage checkpoint (its val_mpjpe is the mean-pose baseline) did not take the
    # one slot: the regression checkpoint did
    assert not fs.exists(f"{run}/epoch_0001")
    assert fs.exists(f"{run}/epoch_0002/{checkpoint.MANIFEST_FILE}")

    # an upload of epoch 3 cut off midway, with a config that is not this run's
    fs.pipe(f"{run}/epoch_0003/{checkpoint.CONFIG_FILE}", b'{"model": {"lrn_alpha": 9}}')
    loc = preflight(cfg)  # the partial folder is not in Ray Train's record: not refused
    assert latest_checkpoint(loc.join("pre")).uri == f"s3://{run}/epoch_0002"
    result = build_trainer(cfg, "pre", loc).fit()
    assert result.metrics["epoch"] == 3
    state = json.loads(fs.cat(f"{run}/epoch_0003/{checkpoint.STATE_FILE}"))
    assert state["epoch"] == 3 and state["stage"] == "regression"

    path, pyfs = storage_retry.ray_storage(loc.join("pre"))
    kept = Result.from_path(path, storage_filesystem=pyfs).best_checkpoints
    assert kept and all(m["has_regression_head"] for _, m in kept)
    assert all(m["checkpoint_score"] == m["val_mpjpe"] for _, m in kept)
    assert not fs.exists(f"{run}/epoch_0001")


@pytest.mark.slow
def test_same_sweep_name_in_two_buckets(ray_local, tiny_data, s3_server, tmp_path, monkeypatch):
    import optuna

    fs = _s3fs(s3_server)
    monkeypatch.setenv("RAYPOSE_LOCAL_DIR", str(tmp_path / "local"))
    studies = []
    for bucket in ("raypose-bucket-a", "raypose-bucket-b"):
        fs.mkdir(bucket)
        cfg = tiny_config(
            tiny_data,
            f"s3://{bucket}/sweeps",
            storage__keep_checkpoints=1,
            scaling__workers=1,
            data__max_train_samples=32,
            data__max_val_samples=16,
        )
        best = run_sweep(cfg, SMOKE, "s1", samples=1, max_concurrent=1)
        # best.json names a checkpoint that retention kept
        stored = json.loads(fs.cat(f"{bucket}/sweeps/s1/best.json"))
        assert stored["checkpoint"] == best["checkpoint"]
        assert stored["checkpoint"].startswith(f"s3://{bucket}/sweeps/s1/train/")
        assert fs.exists(stored["checkpoint"][len("s3://") :] + f"/{checkpoint.MANIFEST_FILE}")
        record = json.loads(fs.cat(f"{bucket}/sweeps/s1/{SWEEP_RECORD}"))
        assert record["samples"] == 1 and record["max_concurrent"] == 1
        assert record["study_url"] == stored["study"]["url"]
        assert fs.exists(f"{bucket}/sweeps/s1/optuna.db")
        studies.append(stored["study"]["url"])
    assert studies[0] != studies[1]
    for url in studies:
        assert len(optuna.load_study(study_name="s1", storage=url).trials) == 1


# ----------------------------------------------------------------------------------------------
# A checkpoint's files into storage (real files, a real S3 server)


def _saved_checkpoint(directory):
    import torch

    return checkpoint.save(
        directory,
        {"w": torch.arange(6.0)},
        {"state": {}, "param_groups": []},
        {"seed": 1},
        {"epoch": 3},
    )


def _inodes(folder):
    return {p.name: (os.stat(p).st_dev, os.stat(p).st_ino) for p in Path(folder).iterdir()}


def test_upload_links_on_local_storage_and_copies_across_devices(tmp_path):
    import shutil
    import tempfile

    import pyarrow.fs

    local = _saved_checkpoint(tmp_path / "spool" / "c1")
    target = tmp_path / "storage" / "epoch_0003"
    # same device: every file a hard link (the same inode), none copied
    assert checkpoint.upload(str(local), str(target), pyarrow.fs.LocalFileSystem()) == 5
    assert _inodes(target) == _inodes(local)
    assert checkpoint.upload(str(local), str(target), pyarrow.fs.LocalFileSystem()) == 5  # again
    shutil.rmtree(local)  # as Ray deletes the local folder after the upload
    assert checkpoint.load(target)["state"] == {"epoch": 3}  # complete, verified by its manifest

    # another device (/dev/shm is a memory filesystem here, /tmp a disk): copies
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        other = _saved_checkpoint(Path(shm) / "c2")
        assert (
            os.stat(other).st_dev != os.stat(tmp_path).st_dev
        )  # the premise of this half of the test
        copied = tmp_path / "storage" / "epoch_0004"
        assert checkpoint.upload(str(other), str(copied), pyarrow.fs.LocalFileSystem()) == 0
        assert not set(_inodes(copied).values()) & set(_inodes(other).values())
    assert checkpoint.load(copied)["state"] == {"epoch": 3}


def test_upload_copies_to_object_storage(tmp_path, s3_bucket):
    from raypose.storage import parse
    from raypose.storage.retry import ray_storage

    endpoint, bucket = s3_bucket
    local = _saved_checkpoint(tmp_path / "c")
    path, fs = ray_storage(parse(f"s3://{bucket}/runs"))  # what Ray Train writes checkpoints with
    assert checkpoint.upload(str(local), f"{path}/r/epoch_0003", fs) == 0
    s3 = _s3fs(endpoint)
    for p in Path(local).iterdir():  # every file, byte for byte
        assert s3.cat(f"{bucket}/runs/r/epoch_0003/{p.name}") == p.read_bytes()
