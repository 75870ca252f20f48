"""The report's PNG figures exist, open, have a sensible size and are not blank."""

import warnings

import numpy as np
import optuna
import pytest
from PIL import Image

from raypose.data.skeleton import H36M_SKELETON
from raypose.evaluation.figures import (
    joint_error_figure,
    learning_curves_figure,
    param_importance_figure,
    param_importances,
    skeleton_figure,
    sweep_history_figure,
)

# a standing pose in camera coordinates (mm): x right, y down, z forward
STANDING = np.array(
    [
        [0, 0, 3000],
        [-130, 0, 3000],
        [-130, 450, 3000],
        [-130, 900, 3050],
        [130, 0, 3000],
        [130, 450, 2990],
        [130, 900, 3000],
        [0, -230, 3000],
        [0, -480, 3010],
        [0, -580, 3000],
        [0, -700, 3000],
        [150, -480, 3010],
        [150, -200, 3010],
        [150, 50, 2900],
        [-150, -480, 3010],
        [-150, -200, 3010],
        [-150, 50, 3100],
    ],
    dtype=np.float64,
)


def _check_png(path, min_side=200, min_std=10.0, min_colours=50):
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert width >= min_side and height >= min_side, img.size
    assert width <= 3000 and height <= 3000, img.size
    assert pixels.std() > min_std
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > min_colours
    return pixels


def test_skeleton_figure(tmp_path):
    rng = np.random.default_rng(0)
    n = 3
    images = rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)
    gt = STANDING[None] + rng.normal(scale=20, size=(n, 17, 3))
    pred = gt + rng.normal(scale=40, size=gt.shape)
    joints_2d = rng.uniform(10, 100, size=(n, 17, 2))
    out = skeleton_figure(
        images, pred, gt, tmp_path / "figs" / "skeletons.png", joints_2d=joints_2d
    )
    assert out == tmp_path / "figs" / "skeletons.png"
    pixels = _check_png(out)
    assert pixels.shape[0] > pixels.shape[1]  # one row per sample


def test_skeleton_figure_on_flat_images_without_2d(tmp_path):
    # flat grey crops: the skeleton plot alone must make the figure non-blank
    images = np.full((1, 112, 112, 3), 128, dtype=np.uint8)
    out = skeleton_figure(
        images, STANDING[None] + 30.0, STANDING[None], tmp_path / "one.png", skeleton=H36M_SKELETON
    )
    _check_png(out)


def test_skeleton_figure_rejects_bad_shapes(tmp_path):
    images = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"pred and gt must both be \[N, 17, 3\]"):
        skeleton_figure(images, np.zeros((2, 16, 3)), np.zeros((2, 16, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\]"):
        skeleton_figure(
            images[..., 0], np.zeros((2, 17, 3)), np.zeros((2, 17, 3)), tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="joints_2d"):
        skeleton_figure(
            images,
            np.zeros((2, 17, 3)),
            np.zeros((2, 17, 3)),
            tmp_path / "x.png",
            joints_2d=np.zeros((2, 17, 3)),
        )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("baseline", [None, 150.0, "per_joint"])
def test_joint_error_figure(tmp_path, baseline):
    rng = np.random.default_rng(1)
    per_joint = {name: float(v) for name, v in zip(H36M_SKELETON.names, rng.uniform(20, 120, 17))}
    if baseline == "per_joint":
        baseline = {name: 1.5 * v for name, v in per_joint.items()}
    out = joint_error_figure(per_joint, tmp_path / "joints.png", baseline=baseline)
    _check_png(out)


def test_joint_error_figure_needs_baseline_for_every_joint(tmp_path):
    with pytest.raises(ValueError, match="baseline has no value for joints \\['Head'\\]"):
        joint_error_figure({"Hip": 1.0, "Head": 2.0}, tmp_path / "j.png", baseline={"Hip": 1.0})


def test_sweep_history_figure(tmp_path):
    rng = np.random.default_rng(2)
    trials = []
    for i in range(12):
        state = "COMPLETE" if i % 4 else "PRUNED"
        trials.append(
            {
                "number": i,
                "value": float(200 - 5 * i + rng.normal(scale=15)),
                "params": {"schedule": "joint" if i % 2 else "pretrain"},
                "state": state,
            }
        )
    trials.append({"number": 12, "value": None, "params": {}, "state": "FAIL"})
    trials.append(
        {"number": 13, "value": None, "params": {}, "state": optuna.trial.TrialState.RUNNING}
    )
    _check_png(sweep_history_figure(trials, tmp_path / "sweep.png"))


def test_sweep_history_figure_with_no_values(tmp_path):
    trials = [{"number": 0, "value": None, "params": {}, "state": "RUNNING"}]
    _check_png(sweep_history_figure(trials, tmp_path / "empty.png"), min_std=5.0)
    _check_png(sweep_history_figure([], tmp_path / "none.png"), min_std=5.0)


def test_param_importance_figure(tmp_path):
    importances = {
        "lr": 0.52,
        "lrn_alpha": 0.21,
        "lambda": 0.15,
        "schedule": 0.07,
        "lrn_beta": 0.05,
    }
    _check_png(param_importance_figure(importances, tmp_path / "importance.png"))


@pytest.mark.parametrize("importances", [{}, None])
def test_param_importance_figure_draws_a_note_when_empty(tmp_path, importances):
    # a note, not a crash, and still a readable image
    _check_png(param_importance_figure(importances, tmp_path / "importance.png"), min_std=5.0)


def test_param_importances_from_a_study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert param_importances(study) == {}

    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        y = trial.suggest_float("y", -1, 1)
        return 10 * x * x + 0.1 * y

    study.optimize(objective, n_trials=1)
    assert param_importances(study) == {}  # one finished trial: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=15)
        importances = param_importances(study)
    assert set(importances) == {"x", "y"} and importances["x"] > importances["y"]
    _check_png(param_importance_figure(importances, tmp_path / "importance.png"))


def _curve(trial_id, schedule, state, epochs, values, best=False, paper=False):
    return {
        "trial_id": trial_id,
        "schedule": schedule,
        "state": state,
        "epochs": epochs,
        "values": values,
        "is_best": best,
        "is_paper_defaults": paper,
    }


def test_learning_curves_figure(tmp_path):
    curves = [
        _curve("t0", "joint", "COMPLETE", [1, 2, 3, 4], [300, 260, 240, 230], paper=True),
        _curve("t1", "joint", "COMPLETE", [1, 2, 3, 4], [280, 220, 200, 190], best=True),
        _curve("t2", "joint", "PRUNED", [1, 2], [320, 310]),
        _curve("t4", "pretrain", "COMPLETE", [2, 3, 4], [270, 230, 210]),
        _curve("t6", "pretrain", "PRUNED", [2], [330]),
        _curve("t7", "pretrain", "ERROR", [], []),
    ]
    out = learning_curves_figure(curves, tmp_path / "curves.png", baseline=250.0)
    _check_png(out, min_colours=200)
    # the best trial is also the paper-defaults one; no baseline; early epochs far above the rest
    curves = [
        _curve("t0", "pretrain", "COMPLETE", [2, 3, 4], [2000, 300, 200], best=True, paper=True),
        _curve("t1", None, "COMPLETE", [1, 2], [900, 250]),
    ]
    _check_png(
        learning_curves_figure(curves, tmp_path / "log.png", note="drawn at the best epoch only")
    )


def test_learning_curves_figure_with_nothing_to_draw(tmp_path):
    out = learning_curves_figure([_curve("t7", "joint", "ERROR", [], [])], tmp_path / "none.png")
    _check_png(out, min_std=5.0, min_colours=10)
