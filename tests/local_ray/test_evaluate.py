"""The evaluation job against a checkpoint held in S3: a moto server on 127.0.0.1, reached over HTTP
through s3fs exactly as AWS would be.  One tiny Ray Train run per module makes the checkpoints;
evaluation itself runs without Ray.

Checked: report.json / report.md / predictions.npz / PNGs locally and in the bucket, the report's
numbers against raypose.model.metrics on the same predictions (and on predictions made here from the
checkpoint), real pictures, the experiment path (best.json, with and without the Optuna study
copy), and one clear error for each kind of bad checkpoint or experiment with storage untouched.
"""

import hashlib
import io
import json
import math
import os
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from raypose import storage
from raypose.cli import main as cli_main
from raypose.evaluation import evaluate, history
from raypose.evaluation.evaluate import EvaluationError
from raypose.storage import checkpoint
from raypose.storage import experiment as experiment_files
from tests.support import free_port, tiny_config

BUCKET = "raypose-eval"
RUN = f"{BUCKET}/exp/evalrun"  # the training run's folder (s3fs paths carry no scheme)
CKPT = f"{RUN}/epoch_0002"
FIRST = f"{RUN}/epoch_0001"
BASE_FILES = {"report.json", "report.md", "predictions.npz", "skeletons.png", "joint_errors.png"}
SWEEP_FILES = {"sweep_history.png", "param_importance.png", "learning_curves.png"}


# ----------------------------------------------------------------------------------------------
# Module fixtures: one moto server, one tiny training run, one evaluation of its last checkpoint


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 for the whole module; yields an s3fs filesystem on it.
    AWS_ENDPOINT_URL points raypose (and the Ray workers, which inherit it) at the server and is
    restored afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        try:  # moto keeps its buckets per process: leave none behind for later modules
            urllib.request.urlopen(
                urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10
            ).close()
        finally:
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def trained(s3, tiny_data):
    """Two epochs of a tiny model (narrow fully connected layers keep the checkpoint small) on a
    local Ray instance, checkpoints in the bucket; Ray is shut down right after training."""
    import ray

    from raypose.train.run import run_training

    cfg = tiny_config(
        tiny_data,
        f"s3://{BUCKET}/exp",
        name="evalrun",
        schedule__epochs=2,
        model__fc1_width=64,
        model__fc2_width=128,
    )
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )
    try:
        result = run_training(cfg)
    finally:
        ray.shutdown()
    assert result.error is None
    s3.invalidate_cache()
    assert s3.exists(f"{CKPT}/manifest.json") and s3.exists(f"{FIRST}/manifest.json")
    return cfg


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """(report, local output folder) of evaluating epoch_0002 by its checkpoint URI."""
    import ray

    out = tmp_path_factory.mktemp("evaluation") / "out"
    report = evaluate.evaluate(f"s3://{CKPT}", out_dir=str(out))
    assert not ray.is_initialized()  # evaluation needs no Ray and starts none
    return report, out


# ----------------------------------------------------------------------------------------------
# Helpers


def snapshot(fs, prefix=BUCKET) -> dict:
    """Every object under prefix with its size, ETag and last-modified time (fresh listing)."""
    fs.invalidate_cache()
    return {
        name: (info["size"], info.get("ETag"), str(info.get("LastModified")))
        for name, info in fs.find(prefix, detail=True).items()
    }


def copy_checkpoint(fs, src=CKPT) -> str:
    """A copy of a checkpoint under a fresh prefix, so each test can damage its own."""
    dst = f"{BUCKET}/cases/{uuid.uuid4().hex[:8]}/run/{src.rsplit('/', 1)[-1]}"
    for name in fs.ls(src, detail=False, refresh=True):
        fs.copy(name, f"{dst}/{name.rsplit('/', 1)[-1]}")
    return dst


def check_png(data: bytes, what: str, min_colours: int = 100) -> None:
    """A real picture: a valid PNG of sensible size, not blank, with many colours.  (Real figures
    here have a pixel std of 30 to 75 and 250 to 250 000 colours; a note-only figure about 37.)"""
    from PIL import Image

    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", what
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = pixels.shape
    assert min(h, w) >= 200, f"{what}: {w} x {h} px"
    assert pixels.std() > 15.0, f"{what} is (nearly) blank: pixel std {pixels.std():.1f}"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours >= min_colours, f"{what} has only {colours} distinct colours"


def numbers(tree, path=""):
    """(path, value) of every number in a nested dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def assert_close_tree(ours, theirs, tol=1e-6, path="report"):
    assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {int, float}, path
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs {sorted(theirs)}"
        for k in ours:
            assert_close_tree(ours[k], theirs[k], tol, f"{path}.{k}")
    else:
        assert abs(ours - theirs) <= tol, f"{path}: {ours} vs {theirs}"


def expect_refusal(fs, uri: str, error, tmp_path, *needles) -> str:
    """Evaluating uri raises one clear `error` naming all needles, through the API and the CLI,
    and changes nothing in storage and writes nothing locally.  Returns the message."""
    before = snapshot(fs)
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        evaluate.evaluate(uri, out_dir=str(out))
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(fs) == before, "evaluation changed storage although it failed"
    assert not out.exists()
    return message


def run_cli(argv, capsys) -> tuple:
    capsys.readouterr()
    rc = cli_main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


# ----------------------------------------------------------------------------------------------
# A checkpoint URI: the report, the numbers, the pictures


def test_report_and_figures_locally_and_in_the_bucket(s3, evaluated):
    report, out = evaluated
    assert {p.name for p in out.iterdir()} == BASE_FILES
    assert report["checkpoint"] == f"s3://{CKPT}" and report["experiment"] is None
    assert report["epoch"] == 2 and report["stage"] == "joint"
    assert report["figures"] == ["skeletons.png", "joint_errors.png"]
    assert report["outputs"]["local"] == str(out.resolve())

    # the storage copy: a new folder next to the checkpoint, the same bytes as the local files
    remote = report["outputs"]["storage"]
    assert remote.startswith(f"s3://{RUN}/evaluation-epoch_0002-")
    s3.invalidate_cache()
    stored = {p.rsplit("/", 1)[-1] for p in s3.ls(remote[len("s3://") :], detail=False)}
    assert stored == BASE_FILES
    for name in BASE_FILES:
        assert s3.cat(f"{remote[len('s3://') :]}/{name}") == (out / name).read_bytes(), name
    assert json.loads(s3.cat(f"{remote[len('s3://') :]}/report.json")) == report

    # the numbers: every action and joint, all three protocols, finite, MPJPE >= P-MPJPE
    test_actions = set(np.load(out / "predictions.npz")["actions"].tolist())
    assert set(report["per_action"]) == test_actions and len(test_actions) >= 3
    from raypose.data.skeleton import H36M_SKELETON

    for protocol in ("mpjpe", "p_mpjpe", "n_mpjpe"):
        assert list(report["per_joint"][protocol]) == list(H36M_SKELETON.names)
        assert protocol in report["mean_over_actions"] and protocol in report["overall"]
        for row in report["per_action"].values():
            assert protocol in row
    sections = {
        k: report[k]
        for k in (
            "per_action",
            "per_joint",
            "mean_over_actions",
            "overall",
            "mean_pose_baseline",
            "detection",
        )
    }
    values = list(numbers(sections))
    assert len(values) > 3 * 17 + 3 * len(test_actions)
    bad = [(p, v) for p, v in values if not math.isfinite(v)]
    assert not bad, bad
    for row in [*report["per_action"].values(), report["mean_over_actions"], report["overall"]]:
        assert row["mpjpe"] >= row["p_mpjpe"] > 0
        assert row["n_mpjpe"] > 0
    assert report["test_samples"] == sum(r["count"] for r in report["per_action"].values())
    assert set(report["mean_pose_baseline"]["per_action"]) == test_actions
    assert report["mean_pose_baseline"]["mpjpe"] > 0
    # the joint schedule trains a detection head: its accuracy is reported
    detection = report["detection"]
    assert 0.0 <= detection["cell_accuracy"] <= 1.0
    assert 0.0 <= detection["top_window_accuracy"] <= 1.0

    md = (out / "report.md").read_text()
    for text in (
        "| raypose |",
        "| raypose P-MPJPE |",
        "| raypose N-MPJPE |",
        "| mean-pose baseline |",
        "## Per joint (mm)",
        "## Per subject (mm)",
        "Detection head",
        f"s3://{CKPT}",
        "skeletons.png",
        remote,
    ):
        assert text in md, text
    for action in test_actions:
        assert action in md
    for joint in H36M_SKELETON.names:
        assert f"| {joint} |" in md

    check_png((out / "joint_errors.png").read_bytes(), "joint_errors.png")
    # the skeleton figure shows the crops themselves: photographs have thousands of colours
    check_png((out / "skeletons.png").read_bytes(), "skeletons.png", min_colours=5000)


def test_picture_check_rejects_blank_images():
    """The PNG check itself: a blank or flat image does not pass for a figure."""
    from PIL import Image, ImageDraw

    for image in (
        Image.new("RGB", (640, 480), "white"),
        Image.new("RGB", (120, 120), (10, 200, 30)),
    ):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        with pytest.raises(AssertionError):
            check_png(buf.getvalue(), "blank")
    two_tone = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(two_tone).rectangle((0, 0, 320, 480), fill="black")
    buf = io.BytesIO()
    two_tone.save(buf, format="PNG")
    with pytest.raises(AssertionError, match="distinct colours"):
        check_png(buf.getvalue(), "two-tone")


def test_report_numbers_equal_raypose_metrics(s3, trained, evaluated, tiny_data, tmp_path):
    from raypose.data.dataset import PoseDataset
    from raypose.data.skeleton import H36M_SKELETON
    from raypose.model.metrics import grouped_report, mean_pose_baseline, mpjpe
    from raypose.train.loop import build_model, predict

    report, out = evaluated
    saved = np.load(out / "predictions.npz")
    names = list(H36M_SKELETON.names)
    train = PoseDataset(
        str(Path(tiny_data) / "train.h5"), exclude_subjects=trained.data.val_subjects
    )
    train_poses = train.root_relative_poses()

    def expected(pred, gt, actions):
        per_action = {a: mean_pose_baseline(train_poses, gt[actions == a]) for a in set(actions)}
        return grouped_report(pred, gt, actions, names), {
            "mpjpe": mean_pose_baseline(train_poses, gt),
            "per_action": per_action,
            "mean_over_actions": float(np.mean(list(per_action.values()))),
        }

    def compare(metrics, baseline):
        for key in ("per_action", "per_joint", "mean_over_actions", "overall"):
            assert_close_tree(metrics[key], report[key], path=key)
        assert_close_tree(baseline, report["mean_pose_baseline"], path="mean_pose_baseline")

    # 1. the predictions evaluate wrote
    compare(*expected(saved["pred_3d"], saved["gt_3d"], saved["actions"]))

    # per subject: each test subject's rows, found from the file's own subject column
    import h5py

    test_file = PoseDataset(str(Path(tiny_data) / "test.h5"), augment=False)
    with h5py.File(test_file.path, "r") as f:
        row_subjects = f["subject"].asstr()[:][test_file.indices[saved["positions"]]]
    assert (
        set(report["per_subject"]) == set(row_subjects.tolist()) and len(report["per_subject"]) == 2
    )
    assert sum(v["count"] for v in report["per_subject"].values()) == report["test_samples"]
    for name, row in report["per_subject"].items():
        sel = row_subjects == name
        assert row["count"] == int(sel.sum())
        assert row["mpjpe"] == pytest.approx(
            mpjpe(saved["pred_3d"][sel], saved["gt_3d"][sel]), rel=1e-9
        )
        assert row["mean_pose_mpjpe"] == pytest.approx(
            mean_pose_baseline(train_poses, saved["gt_3d"][sel]), rel=1e-9
        )
        assert 0.8 < row["size_vs_train"] < 1.25  # synthetic bodies: 0.9 to 1.1 of the mean adult

    # 2. predictions made here from the checkpoint in the bucket, with the model rebuilt from its
    #    own config: the same predictions, hence the same numbers
    local = tmp_path / "ckpt"
    local.mkdir()
    for name in s3.ls(CKPT, detail=False, refresh=True):
        s3.get_file(name, str(local / name.rsplit("/", 1)[-1]))
    loaded = checkpoint.load(local)
    from raypose.config import config_from_dict

    model = build_model(config_from_dict(loaded["config"]), "joint")
    model.load_state_dict(loaded["model"])
    test = PoseDataset(str(Path(tiny_data) / "test.h5"), augment=False)
    pred = predict(model, test, 64, torch.device("cpu"))
    actions = np.array(test.action_names)[pred["actions"]]
    np.testing.assert_array_equal(pred["positions"], saved["positions"])
    np.testing.assert_array_equal(pred["gt_3d"], saved["gt_3d"])
    np.testing.assert_array_equal(actions, saved["actions"])
    np.testing.assert_allclose(pred["pred_3d"], saved["pred_3d"], rtol=0, atol=1e-3)
    compare(*expected(pred["pred_3d"], pred["gt_3d"], actions))
    cell = float(((pred["detection_logits"] > 0) == (pred["detection_targets"] > 0.5)).mean())
    assert abs(cell - report["detection"]["cell_accuracy"]) <= 1e-6


def test_an_output_folder_holding_a_report_is_refused(s3, evaluated, tmp_path):
    report, out = evaluated
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    storage_before = snapshot(s3)
    with pytest.raises(EvaluationError, match="report.json already exists") as caught:
        evaluate.evaluate(f"s3://{CKPT}", out_dir=str(out))
    assert str(out) in str(caught.value)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    assert snapshot(s3) == storage_before


def test_storage_folder_names_never_collide(s3, evaluated):
    """Two evaluations within the same second get different storage folders."""
    from raypose import storage

    report, _ = evaluated
    taken = storage.parse(report["outputs"]["storage"])
    parent = storage.parse(f"s3://{RUN}")
    name = taken.path.rsplit("/", 1)[-1]
    assert experiment_files.free_storage_dir(parent, name).uri == f"{taken.uri}-2"
    assert experiment_files.free_storage_dir(parent, name + "-fresh").uri == f"{taken.uri}-fresh"


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error each, nothing in storage changed or added


def _flip_bytes(fs, path):
    data = bytearray(fs.cat(path))
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    fs.pipe(path, bytes(data))


CORRUPTIONS = {  # case: (damage, what the message must say, also check the command line)
    "corrupt weights": (
        lambda fs, d: _flip_bytes(fs, f"{d}/model.pt"),
        ("model.pt", "does not match its manifest"),
        True,
    ),
    "missing optimizer.pt": (
        lambda fs, d: fs.rm(f"{d}/optimizer.pt"),
        ("optimizer.pt is missing",),
        False,
    ),
    "missing state.json": (
        lambda fs, d: fs.rm(f"{d}/state.json"),
        ("state.json is missing",),
        False,
    ),
    "manifest of another checkpoint": (
        lambda fs, d: fs.copy(f"{FIRST}/manifest.json", f"{d}/manifest.json"),
        ("model.pt", "does not match its manifest", "another checkpoint"),
        False,
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_checkpoint_gives_one_clear_error(s3, trained, tmp_path, capsys, case):
    damage, needles, via_cli = CORRUPTIONS[case]
    ckpt = copy_checkpoint(s3)
    damage(s3, ckpt)
    uri = f"s3://{ckpt}"
    message = expect_refusal(s3, uri, checkpoint.CheckpointError, tmp_path, uri, *needles)
    assert "/tmp" not in message  # the checkpoint in storage is named, not a temporary copy
    if via_cli:  # the command line: exit status 2 and that message on one line
        before = snapshot(s3)
        rc, err = run_cli(["evaluate", uri, "--out", str(tmp_path / "cli")], capsys)
        assert rc == 2
        assert err == [f"raypose evaluate: error: {message}"]
        assert snapshot(s3) == before and not (tmp_path / "cli").exists()


def _touch(path):
    Path(path).write_text("unpickled")
    return {}


class Payload:
    """Pickles as a call of _touch(marker): unpickling it would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickled_objects_are_never_loaded(s3, trained, tmp_path):
    ckpt = copy_checkpoint(s3)
    marker = tmp_path / "payload-ran"
    weights = torch.load(io.BytesIO(s3.cat(f"{ckpt}/model.pt")), weights_only=True)
    evil = tmp_path / "model.pt"
    torch.save({**weights, "payload": Payload(marker)}, evil)
    # control: a plain unpickle of this file does run the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    # the manifest is made to match the new model.pt, so that only weights_only can refuse it
    manifest = json.loads(s3.cat(f"{ckpt}/manifest.json"))
    manifest["files"]["model.pt"] = {
        "size": evil.stat().st_size,
        "sha256": storage.sha256_file(evil),
    }
    s3.put_file(str(evil), f"{ckpt}/model.pt")
    s3.pipe(f"{ckpt}/manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    local = tmp_path / "copy"
    local.mkdir()
    for name in s3.ls(ckpt, detail=False, refresh=True):
        s3.get_file(name, str(local / name.rsplit("/", 1)[-1]))
    checkpoint.verify(local)  # the manifest matches every file

    uri = f"s3://{ckpt}"
    message = expect_refusal(
        s3,
        uri,
        checkpoint.CheckpointError,
        tmp_path,
        uri,
        "model.pt",
        "weights_only=True",
        "objects other than tensors",
        "_touch",
    )
    assert "weights_only=False" not in message  # no advice to load it unsafely
    assert not marker.exists(), "the pickled payload ran"
    with pytest.raises(
        checkpoint.CheckpointError, match="model.pt holds objects other than tensors"
    ):
        checkpoint.load(local)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Experiments: best.json, with and without the Optuna study copy; unfinished sweeps


def write_best(fs, experiment: str, with_trials: bool = True, newer_keys: bool = False) -> dict:
    """A best.json as raypose.search.sweep.run_sweep writes it, pointing at the trained checkpoint;
    newer_keys adds what later sweeps write (trial states, schedules, per-epoch histories, the
    paper-defaults trial and the validation mean-pose baseline)."""
    config = json.loads(fs.cat(f"{CKPT}/config.json"))
    state = json.loads(fs.cat(f"{CKPT}/state.json"))
    # best.json names only checkpoints inside its experiment: the trial's run folder there
    ckpt = f"{experiment}/train/t0/epoch_0002"
    if not fs.exists(f"{ckpt}/manifest.json"):
        fs.copy(CKPT, ckpt, recursive=True)
    params = {"lrn_alpha": 0.0025, "lr": 3e-4, "schedule": "joint"}
    rows = [
        {
            "trial_id": "t0",
            "params": params,
            "epochs": 2,
            "best_val_mpjpe": state["metrics"]["val_mpjpe"],
            "best_epoch": 2,
            "checkpoint_path": ckpt,
            "stopped_early": False,
            "epoch_seconds": 6.0,
            "time_total_s": 9.0,
            "error": None,
        },
        {
            "trial_id": "t1",
            "params": {**params, "lr": 1e-3},
            "epochs": 1,
            "best_val_mpjpe": 480.0,
            "best_epoch": 1,
            "checkpoint_path": None,
            "stopped_early": True,
            "epoch_seconds": 3.0,
            "time_total_s": 4.0,
            "error": None,
        },
        {
            "trial_id": "t2",
            "params": {**params, "lrn_alpha": 0.01},
            "epochs": 2,
            "best_val_mpjpe": 350.0,
            "best_epoch": 2,
            "checkpoint_path": None,
            "stopped_early": False,
            "epoch_seconds": 6.0,
            "time_total_s": 9.0,
            "error": None,
        },
        {
            "trial_id": "t3",
            "params": {**params, "schedule": "pretrain"},
            "epochs": 0,
            "best_val_mpjpe": None,
            "best_epoch": None,
            "checkpoint_path": None,
            "stopped_early": False,
            "epoch_seconds": 0.0,
            "time_total_s": 1.0,
            "error": "RayTaskError",
        },
    ]
    name = experiment.rsplit("/", 1)[-1]
    best = {
        "experiment": f"s3://{experiment}",
        "trial_id": "t0",
        "params": params,
        "config": config,
        "metric": "val_mpjpe",
        "mode": "min",
        "value": state["metrics"]["val_mpjpe"],
        "epoch": 2,
        "checkpoint": f"s3://{ckpt}",
        "study": {
            "url": f"sqlite:////nowhere/{name}/optuna.db",
            "name": name,
            "copy": f"s3://{experiment}/optuna.db",
        },
        "trials": rows if with_trials else [],
        "wall_seconds": 30.0,
        "share_in_epochs": 0.6,
    }
    if newer_keys:
        histories = {
            "t0": [400.0, state["metrics"]["val_mpjpe"]],
            "t1": [480.0],
            "t2": [390.0, 350.0],
            "t3": [],
        }
        for row in rows:
            row.update(
                state={"t1": "PRUNED", "t3": "ERROR"}.get(row["trial_id"], "COMPLETE"),
                schedule=row["params"]["schedule"],
                is_paper_defaults=row["trial_id"] == "t2",
                history=[
                    {"epoch": e + 1, "val_mpjpe": v, "stage": "joint", "has_regression_head": True}
                    for e, v in enumerate(histories[row["trial_id"]])
                ],
            )
        best["val_mean_pose_mpjpe"] = 500.0
        best["paper_defaults"] = {"trial_id": "t2", "params": rows[2]["params"], "value": 350.0}
    fs.pipe(f"{experiment}/best.json", json.dumps(best, indent=1).encode())
    fs.pipe(f"{experiment}/experiment_state-2026-01-01_00-00-00.json", b"{}")
    return best


def make_study(path: Path, name: str) -> None:
    """An Optuna study like a sweep's: 8 trials over three parameters, one of them pruned."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="minimize")
    dists = {
        "lrn_alpha": FloatDistribution(1e-4, 1e-2, log=True),
        "lr": FloatDistribution(1e-5, 1e-3, log=True),
        "schedule": CategoricalDistribution(["joint", "pretrain"]),
    }
    rng = np.random.default_rng(0)
    for i in range(8):
        params = {
            "lrn_alpha": float(10 ** rng.uniform(-4, -2)),
            "lr": float(10 ** rng.uniform(-5, -3)),
            "schedule": ["joint", "pretrain"][i % 2],
        }
        value = (
            300 + 5e4 * params["lr"] + 20 * (params["schedule"] == "pretrain") + rng.normal(0, 2)
        )
        state = optuna.trial.TrialState.PRUNED if i == 5 else optuna.trial.TrialState.COMPLETE
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                value=value,
                state=state,
                intermediate_values={1: value},
            )
        )


def check_experiment_outputs(s3, report, out, figures):
    assert {p.name for p in out.iterdir()} == BASE_FILES | figures
    assert set(report["figures"]) == {"skeletons.png", "joint_errors.png"} | figures
    remote = report["outputs"]["storage"][len("s3://") :]
    run = report["checkpoint"][len("s3://") :].rsplit("/", 1)[0]
    assert remote.startswith(f"{run}/evaluation-epoch_0002-")
    s3.invalidate_cache()
    assert {p.rsplit("/", 1)[-1] for p in s3.ls(remote, detail=False)} == BASE_FILES | figures
    for name in figures | {"skeletons.png", "joint_errors.png"}:
        data = s3.cat(f"{remote}/{name}")
        assert data == (out / name).read_bytes()
        check_png(data, name)
    assert "Sweep:" in (out / "report.md").read_text()


def test_experiment_with_study_copy(s3, trained, evaluated, tmp_path):
    import ray

    experiment = f"{BUCKET}/sweeps/swept"
    best = write_best(s3, experiment, newer_keys=True)
    make_study(tmp_path / "optuna.db", "swept")
    s3.put_file(str(tmp_path / "optuna.db"), f"{experiment}/optuna.db")
    earlier = evaluated[0]["outputs"]["storage"][len("s3://") :]
    earlier_files = snapshot(s3, earlier)
    experiment_files = snapshot(s3, experiment)

    out = tmp_path / "out"
    report = evaluate.evaluate(f"s3://{experiment}", out_dir=str(out))
    assert not ray.is_initialized()
    assert report["experiment"] == f"s3://{experiment}" and report["trial_id"] == best["trial_id"]
    assert report["checkpoint"] == best["checkpoint"]
    assert report["sweep"] == {
        "study_copy": f"s3://{experiment}/optuna.db",
        "history_from": "optuna study copy",
        "trials": 8,
        "note": None,
        "report_note": None,
    }
    check_experiment_outputs(s3, report, out, SWEEP_FILES)
    # the sweep report's sections (raypose report) inside report.md and report.json
    sweep = report["sweep_report"]
    assert sweep["notes"] == [] and set(sweep["importances"]) == {"lrn_alpha", "lr", "schedule"}
    assert sweep["best_vs_paper"]["ratio_best_to_paper"] == pytest.approx(best["value"] / 350.0)
    assert sweep["best_vs_paper"]["ratio_best_to_baseline"] == pytest.approx(best["value"] / 500.0)
    assert sweep["equal_epochs"]["rows"][1]["joint"] == {
        "best": min(best["value"], 350.0),
        "median": (best["value"] + 350.0) / 2,
        "count": 2,
    }
    md = (out / "report.md").read_text()
    for text in (
        "## Sweep report",
        "### Joint vs pretrain at equal epochs",
        "### Best trial vs paper defaults",
        "### Settings to use",
        "raypose train --set",
        "### Trials",
        "| t3 | ERROR: RayTaskError |",
        "![learning curves](learning_curves.png)",
    ):
        assert text in md, text
    # the same checkpoint's earlier evaluation and the experiment folder are untouched
    assert report["outputs"]["storage"] != f"s3://{earlier}"
    assert snapshot(s3, earlier) == earlier_files
    # the experiment's own files are untouched; what is new is the evaluation's folder and the
    # experiment's test-split ledger, which records this read of the test split
    after = snapshot(s3, experiment)
    assert {k: after.get(k) for k in experiment_files} == experiment_files
    remote = report["outputs"]["storage"][len("s3://") :]
    ledger = f"{experiment}/test_reads.json"
    assert all(k.startswith(remote + "/") for k in set(after) - set(experiment_files) - {ledger})
    assert report["test_reads"] == {"count": 1, "ledger": f"s3://{ledger}"}
    # the numbers do not depend on how the checkpoint was named
    for key in ("per_action", "per_joint", "mean_over_actions", "mean_pose_baseline", "detection"):
        assert_close_tree(report[key], evaluated[0][key], path=key)

    trials, importances = history.study_history(tmp_path / "optuna.db", "swept")
    assert len(trials) == 8 and set(importances) == {"lrn_alpha", "lr", "schedule"}


def test_experiment_without_study_copy(s3, trained, tmp_path):
    """No optuna.db next to best.json: the history is drawn from best.json's trial rows and the
    importance figure carries a note instead of bars."""
    experiment = f"{BUCKET}/sweeps/nostudy"
    best = write_best(s3, experiment)
    out = tmp_path / "out"
    report = evaluate.evaluate(f"s3://{experiment}", out_dir=str(out))
    sweep = report["sweep"]
    assert sweep["study_copy"] is None and sweep["history_from"] == "best.json"
    assert sweep["trials"] == 4
    assert f"no copy of the Optuna study at s3://{experiment}/optuna.db" in sweep["note"]
    assert sweep["note"] in (out / "report.md").read_text()
    check_experiment_outputs(s3, report, out, SWEEP_FILES)
    assert [t["state"] for t in history.trials_from_best(best)] == [
        "COMPLETE",
        "PRUNED",
        "COMPLETE",
        "FAIL",
    ]
    # an older best.json: the sweep report's sections are there, and say what they lacked
    notes = " ".join(report["sweep_report"]["notes"])
    assert "no per-epoch 'history'" in notes and "no 'paper_defaults'" in notes
    assert "### Notes" in (out / "report.md").read_text()


def test_sweep_figures_without_any_history(tmp_path):
    """Neither a study copy nor trial rows: sweep_history.png is left out (there is nothing to
    draw), param_importance.png says why; an unreadable study copy falls back to the rows."""
    from raypose import storage

    copy = storage.parse(f"s3://{BUCKET}/sweeps/empty/optuna.db")
    sweep = history.sweep_history({"trials": []}, None, copy)
    assert sweep["trials"] == [] and sweep["source"] is None and sweep["importances"] == {}
    assert copy.uri in sweep["note"] and "sweep_history.png not drawn" in sweep["note"]
    broken = tmp_path / "optuna.db"
    broken.write_bytes(b"not a database")
    rows = [{"params": {"lr": 1e-3}, "best_val_mpjpe": 300.0}]
    sweep = history.sweep_history({"trials": rows}, broken, copy)
    assert sweep["source"] == "best.json" and len(sweep["trials"]) == 1
    assert "could not be read" in sweep["note"]


def test_experiment_figures_follow_the_sweep_source(evaluated, tiny_data, tmp_path):
    """write_figures draws sweep_history.png only when there is a history, param_importance.png
    always (with the note when there are no importances), and says so in report['sweep']."""
    from raypose import storage
    from raypose.data.dataset import PoseDataset

    report, out = evaluated
    saved = np.load(out / "predictions.npz")
    pred = {k: saved[k] for k in ("pred_3d", "gt_3d", "positions")}
    test = PoseDataset(str(Path(tiny_data) / "test.h5"), augment=False)
    experiment = storage.parse(f"s3://{BUCKET}/sweeps/empty")
    target = {"experiment": experiment, "best": {"trials": []}}
    fig_dir = tmp_path / "figures"
    fig_dir.mkdir()
    partial = {k: report[k] for k in ("per_joint", "mean_pose_baseline")}
    names = evaluate.write_figures(fig_dir, test, pred, partial, None, target)
    assert names == ["skeletons.png", "joint_errors.png", "param_importance.png"]
    assert sorted(p.name for p in fig_dir.iterdir()) == sorted(names)
    assert partial["sweep"]["history_from"] is None and "not drawn" in partial["sweep"]["note"]
    assert partial["sweep_report"] is None
    assert partial["sweep"]["report_note"].startswith("sweep report left out: ")
    assert "best.json has no 'trial_id' key" in partial["sweep"]["report_note"]
    check_png((fig_dir / "param_importance.png").read_bytes(), "param_importance.png with a note")


@pytest.mark.parametrize("layout", ["tune experiment_state", "train folder"])
def test_experiment_without_best_json(s3, tmp_path, capsys, layout):
    experiment = f"{BUCKET}/unfinished/{uuid.uuid4().hex[:8]}"
    if layout == "tune experiment_state":
        s3.pipe(f"{experiment}/experiment_state-2026-01-01_00-00-00.json", b"{}")
        s3.pipe(f"{experiment}/train_driver_fn_0001/params.json", b"{}")
    else:
        s3.pipe(f"{experiment}/train/checkpoint_manager_snapshot.json", b"{}")
    uri = f"s3://{experiment}"
    message = expect_refusal(s3, uri, EvaluationError, tmp_path, uri, "no best.json", "--resume")
    before = snapshot(s3)
    rc, err = run_cli(["evaluate", uri, "--out", str(tmp_path / "cli")], capsys)
    assert rc == 2 and err == [f"raypose evaluate: error: {message}"]
    assert snapshot(s3) == before and not (tmp_path / "cli").exists()


def test_training_run_folder_points_at_its_checkpoints(s3, trained, tmp_path):
    expect_refusal(
        s3,
        f"s3://{RUN}",
        EvaluationError,
        tmp_path,
        "is a training run",
        "epoch_0001",
        f"s3://{CKPT}",
    )


# ----------------------------------------------------------------------------------------------
# The paper's rows and the one-line summary


def _report_for_markdown(
    per_action: dict, baseline_per_action: dict, overall_baseline: float
) -> dict:
    """The part of a report that markdown_report and summary_line read, for given per-action numbers."""
    pa = {
        a: {"mpjpe": v, "p_mpjpe": v / 2, "n_mpjpe": v * 0.9, "std_mpjpe": 1.0, "count": 1}
        for a, v in per_action.items()
    }
    mean = {
        k: float(np.mean([row[k] for row in pa.values()])) for k in ("mpjpe", "p_mpjpe", "n_mpjpe")
    }
    return {
        "checkpoint": "s3://b/run/epoch_0001",
        "epoch": 1,
        "stage": "joint",
        "test_samples": len(pa),
        "per_action": pa,
        "mean_over_actions": mean,
        "per_joint": {k: {"Hip": 1.0} for k in ("mpjpe", "p_mpjpe", "n_mpjpe")},
        "mean_pose_baseline": {
            "mpjpe": overall_baseline,
            "per_action": baseline_per_action,
            "mean_over_actions": float(np.mean(list(baseline_per_action.values()))),
        },
        "detection": None,
    }


def test_paper_rows_match_the_converters_action_names():
    """raypose.data.h36m names actions after their directories (TakingPhoto, WalkingDog); the paper's
    table writes "Taking Photo", "Walking Dog".  Both spellings, and the original "Photo" and
    "WalkDog", find the paper's number."""
    multi_task = evaluate.PAPER_RESULTS["DconvMP-HML (multi-task, paper)"]
    pretrained = evaluate.PAPER_RESULTS["DconvMP (detection-pretrained, paper)"]
    for name in ("TakingPhoto", "Taking Photo", "takingphoto", "Photo"):
        assert evaluate.paper_value(multi_task, name) == 189.08
    for name in ("WalkingDog", "WalkDog", "Walking Dog"):
        assert evaluate.paper_value(multi_task, name) == 146.59
    assert evaluate.paper_value(multi_task, "Walking") == 77.60
    assert evaluate.paper_value(pretrained, "WalkingDog") is None
    assert evaluate.paper_value(multi_task, "Sitting") is None

    actions = {"TakingPhoto": 150.0, "Walking": 80.0, "WalkingDog": 120.0}
    report = _report_for_markdown(actions, dict(actions), 100.0)
    report["data_source"] = "h36m"  # the paper's figures stand beside Human3.6M test data only
    md = evaluate.markdown_report(report)
    header = next(line for line in md.splitlines() if line.startswith("| method | TakingPhoto"))
    assert header == "| method | TakingPhoto | Walking | WalkingDog | mean |"
    assert "| DconvMP-HML (multi-task, paper) | 189.08 | 77.60 | 146.59 | - |" in md
    assert "| DconvMP (detection-pretrained, paper) | 190.37 | 80.09 | - | - |" in md
    # the same report on synthetic test data: no paper figure, and one line saying why
    report["data_source"] = "synth"
    md = evaluate.markdown_report(report)
    assert "DconvMP" not in md and "LinKDE" not in md
    assert "figures are not shown: this test split is not Human3.6M (source synth)" in md


def test_summary_line_compares_means_over_actions():
    """Two actions of unequal size: the model's mean over actions stands beside the baseline's
    mean over actions (each action once), not beside the sample-weighted baseline."""
    report = _report_for_markdown(
        {"Walking": 100.0, "Eating": 200.0},
        {"Walking": 300.0, "Eating": 500.0},
        overall_baseline=320.0,
    )  # e.g. 9 Walking samples to 1 Eating
    line = evaluate.summary_line(report)
    assert "mean over actions: MPJPE 150.0 mm" in line
    assert "mean-pose baseline MPJPE 400.0 mm" in line and "320.0" not in line
    md = evaluate.markdown_report(report)
    assert "| mean-pose baseline | 500.00 | 300.00 | 400.00 |" in md


def test_missing_uri_and_bad_best_json(s3, tmp_path):
    expect_refusal(
        s3,
        f"s3://{BUCKET}/nothing/here",
        EvaluationError,
        tmp_path,
        f"s3://{BUCKET}/nothing/here",
        "does not exist",
    )
    s3.pipe(f"{BUCKET}/badbest/best.json", b'{"experiment": "x"}')
    expect_refusal(
        s3,
        f"s3://{BUCKET}/badbest",
        EvaluationError,
        tmp_path,
        f"s3://{BUCKET}/badbest/best.json",
        "'checkpoint'",
    )
    s3.pipe(f"{BUCKET}/notjson/best.json", b'{"experiment": ')
    expect_refusal(
        s3,
        f"s3://{BUCKET}/notjson",
        EvaluationError,
        tmp_path,
        f"s3://{BUCKET}/notjson/best.json",
        "is not JSON",
    )


def test_per_subject_shows_a_body_larger_than_the_training_bodies():
    """A test subject 10 % larger than every training body, predicted as the training mean pose
    of its own shape: its size reads 1.1x, and the error that is only scale disappears under
    N-MPJPE while MPJPE keeps it."""

    rng = np.random.default_rng(5)
    train = rng.normal(scale=200, size=(40, 17, 3))
    train -= train[:, :1]
    gt = np.concatenate([1.1 * train[:10], train[:10]])  # the same poses, S9's body 10 % larger
    pred = np.concatenate([train[:10], train[:10]])  # the right shape at the training size
    subjects = np.array(["S9"] * 10 + ["S11"] * 10)
    rows = evaluate.per_subject(pred, gt, subjects, train)
    assert list(rows) == ["S11", "S9"]
    assert rows["S9"]["count"] == 10 and rows["S11"]["count"] == 10
    assert rows["S9"]["size_vs_train"] == pytest.approx(
        1.1 * rows["S11"]["size_vs_train"], rel=1e-9
    )
    assert rows["S9"]["mpjpe"] > 10 and rows["S9"]["n_mpjpe"] == pytest.approx(0, abs=1e-6)
    assert rows["S11"]["mpjpe"] == pytest.approx(0, abs=1e-9)
    md = evaluate.markdown_report(
        {**_report_for_markdown({"walk": 1.0}, {"walk": 2.0}, 2.0), "per_subject": rows}
    )
    assert "## Per subject (mm)" in md and "| S9 | 10 |" in md
