"""The image baselines (raypose.model.baselines) on hand-made data with known answers, and in a
real evaluation: a checkpoint written with raypose.storage.checkpoint.save, real HDF5 files, no Ray.
"""

import h5py
import numpy as np
import pytest
import torch

from raypose.config import Config
from raypose.data.dataset import PoseDataset
from raypose.data.schema import SplitWriter
from raypose.data.synth import synthesize
from raypose.evaluation import evaluate
from raypose.model import baselines
from raypose.model.metrics import mpjpe
from raypose.storage import checkpoint
from raypose.train.loop import build_model, build_optimizer


def random_crops(rng, n) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 128, 128, 3), dtype=np.uint8)


def random_poses(rng, n) -> np.ndarray:
    poses = rng.normal(scale=300.0, size=(n, 17, 3))
    return poses - poses[:, :1]  # root-relative, as the evaluation compares them


def in_memory_reader(images):
    """A read_images for arrays held here: (the rows at positions, each position's index)."""
    return lambda positions: (images[np.asarray(positions)], np.arange(len(positions)))


# ----------------------------------------------------------------------------------------------
# features


def test_features_hand_computed():
    """Left half black, right half white: the centre crop (columns 8..119) turns white at its
    column 56, which is where block 8 of 7 pixels begins, so blocks 0-7 are 0 and 8-15 are 255:
    minus the mean 127.5 and over the std 127.5, -1 and +1 exactly."""
    image = np.zeros((1, 128, 128, 3), np.uint8)
    image[:, :, 64:] = 255
    features = baselines.image_features(image).reshape(16, 16)
    np.testing.assert_allclose(features[:, :8], -1.0, atol=1e-6)
    np.testing.assert_allclose(features[:, 8:], 1.0, atol=1e-6)
    # the 8-pixel border outside the centre crop plays no part
    framed = image.copy()
    framed[:, :8] = 77
    framed[:, :, :8] = 13
    np.testing.assert_array_equal(baselines.image_features(framed), baselines.image_features(image))
    # a flat crop has no contrast to normalise: all zeros, not NaN
    flat = np.full((1, 128, 128, 3), 90, np.uint8)
    assert not baselines.image_features(flat).any()


def test_features_ignore_brightness_and_contrast():
    """An affine change of the grey levels (x / 2 + 40) leaves the features as they were, up to
    the rounding of the changed image to whole uint8 levels: at most half a level there, one
    level of the original, in each block mean, which moves a normalised feature by at most
    2 / (the image's std of block means); crops of 16-pixel squares of random levels keep that
    std near 74 levels."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    images = coarse.repeat(16, axis=1).repeat(16, axis=2)  # [4, 128, 128, 3]
    dimmer = (images.astype(np.float64) / 2 + 40).round().astype(np.uint8)
    grey = images[:, 8:120, 8:120].astype(np.float64) @ baselines.LUMA
    block_std = grey.reshape(4, 16, 7, 16, 7).mean(axis=(2, 4)).reshape(4, -1).std(axis=1)
    assert block_std.min() > 30
    np.testing.assert_allclose(
        baselines.image_features(dimmer),
        baselines.image_features(images),
        rtol=0,
        atol=2 / block_std.min(),
    )


# ----------------------------------------------------------------------------------------------
# nearest neighbour


def test_nearest_neighbour_returns_the_pose_of_an_equal_training_crop():
    rng = np.random.default_rng(1)
    train_images, train_poses = random_crops(rng, 40), random_poses(rng, 40)
    picked = np.array([5, 0, 39, 17, 5])
    test_images = train_images[picked].copy()
    test_images[1] = (test_images[1] // 2 + 60).astype(np.uint8)  # a dimmer copy: same features
    train_features = baselines.dataset_features(
        in_memory_reader(train_images), np.arange(40), chunk=7
    )
    test_features = baselines.dataset_features(in_memory_reader(test_images), np.arange(5))
    for memory in (baselines.NN_MEMORY_BYTES, 1):  # one block, or one test row per block
        found = baselines.nearest_neighbour(train_features, test_features, memory_bytes=memory)
        np.testing.assert_array_equal(found, picked)
        np.testing.assert_array_equal(train_poses[found], train_poses[picked])
    # the features read in chunks of 7 are the features of all crops at once
    np.testing.assert_array_equal(train_features, baselines.image_features(train_images))


def test_nearest_neighbour_blocks_agree_with_brute_force():
    """Thousands of training rows, the distance block cut to a few rows: the same index as a
    full distance matrix (random float features: no ties)."""
    rng = np.random.default_rng(2)
    train = rng.normal(size=(5000, 256)).astype(np.float32)
    test = rng.normal(size=(60, 256)).astype(np.float32)
    full = [np.linalg.norm(train.astype(np.float64) - t, axis=1).argmin() for t in test]
    small = baselines.nearest_neighbour(train, test, memory_bytes=4 * 5000 * 7)  # 7 rows a block
    np.testing.assert_array_equal(small, full)


# ----------------------------------------------------------------------------------------------
# ridge regression


def linear_problem(rng, n, noise=0.0):
    """Features and 17 x 3 poses with poses = features @ W + b (+ noise)."""
    features = rng.normal(size=(n, 256)).astype(np.float32)
    weights = rng.normal(scale=10.0, size=(256, 51))
    offset = rng.normal(scale=100.0, size=51)
    targets = features.astype(np.float64) @ weights + offset
    targets += rng.normal(scale=noise, size=targets.shape)
    return features, targets.reshape(n, 17, 3), weights, offset


def test_ridge_recovers_a_linear_map():
    """Noiseless poses = X W + b, 3000 Gaussian rows of 256 features: the smallest eigenvalue of
    the centred X'X is about 3000 (1 - sqrt(256/3000))^2 ~ 1500 and the mean about 3000, so
    alpha 1e-6 shrinks by at most lambda / 1500 ~ 2e-6 of poses ~ 200 mm: 1e-3 mm is ample."""
    rng = np.random.default_rng(3)
    features, poses, weights, offset = linear_problem(rng, 3000)
    ridge = baselines.fit_ridge(features, poses, alphas=(1e-6,))[0]
    test_features, test_poses, _, _ = (features[:0], poses[:0], None, None)
    test_features = rng.normal(size=(50, 256)).astype(np.float32)
    test_poses = (test_features.astype(np.float64) @ weights + offset).reshape(50, 17, 3)
    np.testing.assert_allclose(
        baselines.predict_ridge(ridge, test_features), test_poses, rtol=0, atol=1e-3
    )
    # lambda is alpha x the mean eigenvalue of the centred Gram matrix
    centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    assert ridge["lambda"] == pytest.approx(1e-6 * (centred**2).sum() / 256, rel=1e-9)


def test_ridge_chooses_alpha_on_held_out_training_samples():
    """Noiseless linear poses: the smallest alpha predicts the held-out subject best, and the
    refitted map predicts new rows within 0.1 mm (alpha 1e-4 shrinks by ~0.3 / 1500 of ~200 mm,
    about 0.04 mm). Poses that are pure noise: the largest alpha (closest to the mean pose)."""
    rng = np.random.default_rng(4)
    features, poses, weights, offset = linear_problem(rng, 3000)
    groups = np.array(["S1", "S5", "S6"] * 1000)
    ridge = baselines.choose_ridge(features, poses, groups)
    assert ridge["alpha"] == min(baselines.RIDGE_ALPHAS)
    assert ridge["validation"]["split"] == "training subject S6 held out"
    scores = ridge["validation"]["mpjpe_by_alpha"]
    assert list(scores) == [f"{a:g}" for a in baselines.RIDGE_ALPHAS]
    assert all(a < b for a, b in zip(list(scores.values()), list(scores.values())[1:]))
    new = rng.normal(size=(20, 256)).astype(np.float32)
    truth = (new.astype(np.float64) @ weights + offset).reshape(20, 17, 3)
    assert np.abs(baselines.predict_ridge(ridge, new) - truth).max() < 0.1

    noise = rng.normal(scale=100.0, size=poses.shape)
    ridge = baselines.choose_ridge(features, noise, groups)
    assert ridge["alpha"] == max(baselines.RIDGE_ALPHAS)
    scores = ridge["validation"]["mpjpe_by_alpha"]
    assert scores[f"{max(baselines.RIDGE_ALPHAS):g}"] < scores[f"{min(baselines.RIDGE_ALPHAS):g}"]


def test_validation_split():
    held, text = baselines.validation_split(["S1", "S7", "S5", "S7"])
    assert held.tolist() == [False, True, False, True] and text == "training subject S7 held out"
    held, text = baselines.validation_split(["S1"] * 10)
    assert held.tolist() == [False] * 8 + [True] * 2
    assert text == "the last 2 of 10 training rows held out"
    held, text = baselines.validation_split(["S1"] * 3)
    assert held is None and "too few" in text
    # too few to hold out: the fixed alpha, said so
    rng = np.random.default_rng(5)
    ridge = baselines.choose_ridge(
        rng.normal(size=(3, 256)).astype(np.float32), random_poses(rng, 3), ["S1"] * 3
    )
    assert ridge["alpha"] == baselines.DEFAULT_ALPHA
    assert ridge["validation"]["mpjpe_by_alpha"] is None
    assert "fixed" in ridge["validation"]["split"]


def test_grouped_baseline_weights_each_action_once():
    gt = np.zeros((4, 17, 3))
    pred = np.zeros((4, 17, 3))
    pred[:, 1:, 0] = [[10.0], [10.0], [10.0], [40.0]]  # every non-root joint 10 or 40 mm off
    out = baselines.grouped_baseline(pred, gt, np.array(["Walking"] * 3 + ["Eating"]))
    # 16 of 17 joints off (the root is aligned): 10 * 16 / 17 and 40 * 16 / 17
    assert out["per_action"] == pytest.approx({"Eating": 640 / 17, "Walking": 160 / 17})
    assert out["mean_over_actions"] == pytest.approx((640 / 17 + 160 / 17) / 2)
    assert out["mpjpe"] == pytest.approx((3 * 160 / 17 + 640 / 17) / 4)


def test_evenly_spaced():
    assert baselines.evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert baselines.evenly_spaced(101, 5).tolist() == [0, 25, 50, 75, 100]


# ----------------------------------------------------------------------------------------------
# in an evaluation


def write_split(path, rows: dict, subject=None):
    with SplitWriter(path, source="synth", attrs={"mirror_consistent": False}) as writer:
        writer.append(
            images=rows["images"],
            joints_3d=rows["joints_3d"],
            joints_2d=rows["joints_2d"],
            subject=[subject] * len(rows["images"]) if subject else rows["subject"],
            action=rows["action"],
            camera=rows["camera"],
            frame=rows["frame"],
        )


@pytest.fixture(scope="module")
def copied_test_data(tmp_path_factory):
    """Synthetic train.h5 (S1 S5 S6 S7 S8) and a test.h5 whose rows are train.h5's S1 rows under
    the name S9: every test crop is also a training crop, so the nearest-neighbour baseline's
    error is 0."""
    d = tmp_path_factory.mktemp("copied")
    synthesize(str(d), 100, 10, seed=0, progress=False)
    with h5py.File(d / "train.h5", "r") as f:
        subjects = f["subject"].asstr()[:]
        rows = np.flatnonzero(subjects == "S1")
        copy = {k: f[k][rows] for k in ("images", "joints_3d", "joints_2d", "frame")}
        copy.update({k: f[k].asstr()[rows].tolist() for k in ("action", "camera")})
    (d / "test.h5").unlink()
    write_split(d / "test.h5", copy, subject="S9")
    return d, len(rows)


def test_image_baselines_on_split_files(copied_test_data):
    d, n_test = copied_test_data
    cfg = Config()
    train = PoseDataset(str(d / "train.h5"), exclude_subjects=list(cfg.data.val_subjects))
    test = PoseDataset(str(d / "test.h5"), augment=False)
    train_poses = train.root_relative_poses()
    test_poses = test.root_relative_poses()
    actions = np.array(test.action_names)[test.sample_actions]
    groups = np.array(train.subjects)[train.sample_subjects]
    out = baselines.image_baselines(
        train, train_poses, groups, test, np.arange(len(test)), test_poses, actions
    )
    nearest, ridge = out["nearest_neighbour_baseline"], out["ridge_baseline"]
    assert nearest["mpjpe"] == 0.0 and set(nearest["per_action"].values()) == {0.0}
    assert set(nearest["per_action"]) == set(actions.tolist())
    assert nearest["train_samples"] == len(train) and ridge["train_samples"] == len(train)
    # ridge: refitted on every training sample with the alpha chosen on a held-out subject
    assert ridge["validation"]["split"] == f"training subject {train.subjects[-1]} held out"
    features = baselines.dataset_features(train.read_images, np.arange(len(train)))
    refit = baselines.fit_ridge(features, train_poses, (ridge["alpha"],))[0]
    test_features = baselines.dataset_features(test.read_images, np.arange(len(test)))
    assert ridge["mpjpe"] == pytest.approx(
        mpjpe(baselines.predict_ridge(refit, test_features), test_poses), rel=1e-9
    )
    # max_train: evenly spaced training samples, and the nearest crop among them
    few = baselines.image_baselines(
        train, train_poses, groups, test, np.arange(len(test)), test_poses, actions, max_train=5
    )
    assert few["nearest_neighbour_baseline"]["train_samples"] == 5


def test_evaluation_reports_both_baselines(copied_test_data, tmp_path):
    """evaluate() on a saved checkpoint: report.json, report.md and the one-line result carry
    both baselines beside the mean pose, per action and as the mean over actions."""
    d, n_test = copied_test_data
    cfg = Config()
    cfg.data.path = str(d)
    cfg.model.fc1_width, cfg.model.fc2_width = 16, 16
    torch.manual_seed(0)
    model = build_model(cfg, "joint")
    state = {
        "epoch": 1,
        "stage": "joint",
        "metrics": {"val_mpjpe": 100.0},
        "heads": {"regression": True, "detection": True},
    }
    ckpt = tmp_path / "run" / "epoch_0001"
    checkpoint.save(
        ckpt, model.state_dict(), build_optimizer(cfg, model).state_dict(), cfg.to_dict(), state
    )
    out = tmp_path / "out"
    report = evaluate.evaluate(str(ckpt), out_dir=str(out))
    actions = set(report["per_action"])
    for key in ("nearest_neighbour_baseline", "ridge_baseline"):
        entry = report[key]
        assert set(entry["per_action"]) == actions
        assert entry["mean_over_actions"] == pytest.approx(
            np.mean(list(entry["per_action"].values())), rel=1e-12
        )
    # every test crop is a training crop (of S1, which training keeps): the neighbour's pose is
    # the test pose; to float32 rounding of root-relative joints of a few hundred mm
    assert report["nearest_neighbour_baseline"]["mpjpe"] < 1e-3
    assert report["ridge_baseline"]["mpjpe"] > 1.0
    assert report["mean_pose_baseline"]["mean_over_actions"] > 1.0  # kept as it was
    assert report["test_samples"] == n_test
    assert report["test_frames"] == {}  # synthetic data states no frame selection
    md = (out / "report.md").read_text()
    for name, key in (
        ("nearest-neighbour baseline", "nearest_neighbour_baseline"),
        ("ridge baseline", "ridge_baseline"),
    ):
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith(f" | {report[key]['mean_over_actions']:.2f} |")
    assert "Test frames:" not in md
    line = evaluate.summary_line(report)
    assert "mean-pose baseline MPJPE" in line
    assert (
        f"nearest-neighbour baseline {report['nearest_neighbour_baseline']['mean_over_actions']:.1f} mm"
        in line
    )
    assert f"ridge baseline {report['ridge_baseline']['mean_over_actions']:.1f} mm" in line


def test_a_grid_computes_the_baselines_once_for_the_same_samples(copied_test_data, tmp_path):
    """Two networks evaluated with one memo (as evaluate_grid's trials are) on the same data: the
    image baselines are computed once and both reports carry the same figures, while each network
    keeps its own MPJPE; an evaluation without the memo computes them again, to the same figures."""
    d, _ = copied_test_data
    cfg = Config()
    cfg.data.path = str(d)
    cfg.model.fc1_width, cfg.model.fc2_width = 16, 16
    state = {
        "epoch": 1,
        "stage": "joint",
        "metrics": {"val_mpjpe": 100.0},
        "heads": {"regression": True, "detection": True},
    }
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(cfg, "joint")
        ckpts.append(tmp_path / f"run{seed}" / "epoch_0001")
        checkpoint.save(
            ckpts[-1],
            model.state_dict(),
            build_optimizer(cfg, model).state_dict(),
            cfg.to_dict(),
            state,
        )
    calls = []
    real = evaluate.image_baselines

    def counted(*args, **kwargs):
        calls.append(len(args[4]))  # the test positions it scores
        return real(*args, **kwargs)

    memo = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "image_baselines", counted)
        first, second = (
            evaluate.evaluate(str(c), out_dir=str(tmp_path / f"out{i}"), memo=memo)
            for i, c in enumerate(ckpts)
        )
        assert len(calls) == 1
        for key in ("nearest_neighbour_baseline", "ridge_baseline"):
            assert second[key] == first[key]
        # two different networks
        assert second["mean_over_actions"]["mpjpe"] != first["mean_over_actions"]["mpjpe"]
        # without the memo (a plain evaluation) the baselines are computed as before
        alone = evaluate.evaluate(str(ckpts[1]), out_dir=str(tmp_path / "alone"))
        assert len(calls) == 2 and alone["ridge_baseline"] == second["ridge_baseline"]
