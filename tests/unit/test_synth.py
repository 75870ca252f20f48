"""The synthetic renderer: depth order, depth cues, side colours that survive a flip, and a small
generated dataset that follows the schema, keeps its joints inside the crop and has disjoint splits."""

import h5py
import numpy as np
import pytest
from PIL import Image

from raypose import cli
from raypose.data import synth
from raypose.data.schema import validate_file
from raypose.data.skeleton import H36M_SKELETON

# a camera whose crop is the image itself around the principal point: crop pixel (64, 64) is the
# image point (0, 0), 1 crop pixel = 1 image pixel, f = 1000 px
FOCAL = np.array([[1000.0, 1000.0]])
CENTRE = np.array([[0.0, 0.0]])
CROP = np.array([[-64.0, -64.0, 128.0]])
RED, BLUE, GREY = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.6, 0.6, 0.6)


def render(capsules, depth_ref=None):
    """capsules: list of (start mm, end mm, radius mm, colour) -> image (128, 128, 3), part, depth."""
    starts = np.array([[c[0] for c in capsules]], dtype=np.float64)
    ends = np.array([[c[1] for c in capsules]], dtype=np.float64)
    radii = np.array([[c[2] for c in capsules]])
    colours = np.array([[c[3] for c in capsules]])
    image, part, depth = synth.render_capsules(
        starts, ends, radii, colours, FOCAL, CENTRE, CROP, depth_ref=depth_ref
    )
    return image[0], part[0], depth[0]


def test_nearer_limb_covers_farther_limb():
    near = ((-300, 0, 3000), (300, 0, 3000), 50, RED)  # horizontal, 3 m away
    far = ((0, -500, 5000), (0, 500, 5000), 80, BLUE)  # vertical, 5 m away, crossing it
    for order in ([near, far], [far, near]):  # drawing order must not matter
        image, part, depth = render(order)
        red_index = order.index(near)
        # the crossing, at the image point (0, 0) = crop pixel (64, 64): both cover it, red is nearer
        assert part[64, 64] == red_index
        assert image[64, 64, 0] > 0.3 and image[64, 64, 2] == 0
        assert depth[64, 64] == pytest.approx(3000 - 50, abs=2)  # the tube's front surface
        # 40 px below the crossing only the far limb is there (red's radius is 50 / 3000 * 1000 = 17 px)
        assert part[104, 64] == 1 - red_index and image[104, 64, 2] > 0.2 and image[104, 64, 0] == 0
        assert part[5, 5] == -1 and (image[5, 5] == 0).all()  # background


def test_depth_cues_shading_and_size():
    # a grey limb slanting from 3 m to 5 m (image x = f * X / Z: -50 to +30 px, crop columns
    # 14 to 94): its near end is nearer and brighter than its far end. On the axis at column 20,
    # z = 3150 - 60 (surface) and the brightness is 0.6 * (1 - 0.45 * (3090 - 4000) / 1000) = 0.85;
    # at column 88, z = 4850 - 60 and it is 0.6 * 0.64 = 0.39.
    image, _, depth = render([((-150, 0, 3000), (150, 0, 5000), 60, GREY)], depth_ref=4000)
    assert depth[64, 20] == pytest.approx(3090, abs=15) and depth[64, 88] == pytest.approx(
        4790, abs=15
    )
    assert image[64, 20].mean() == pytest.approx(0.85, abs=0.02)
    assert image[64, 88].mean() == pytest.approx(0.39, abs=0.02)
    # the same sphere twice as far covers a quarter of the pixels
    area = [(render([((0, 0, z), (0, 0, z), 100, GREY)])[1] == 0).sum() for z in (3000, 6000)]
    assert area[0] == pytest.approx(np.pi * (100 * 1000 / 3000) ** 2, rel=0.03)
    assert area[0] / area[1] == pytest.approx(4.0, rel=0.06)
    # a tube is darker at its rim than on its axis
    image, _, _ = render([((0, -500, 4000), (0, 500, 4000), 100, GREY)], depth_ref=4000)
    assert image[64, 64].mean() > 1.5 * image[64, 64 + 24].mean() > 0


def standing_scenes(yaws, swapped=None):
    n = len(yaws)
    return {
        "subject": np.zeros(n, int),
        "action": np.full(n, synth.ACTIONS.index("walk")),
        "phase": np.zeros(n),
        "camera": np.zeros(n, int),
        "yaw": np.array(yaws),
        "pitch": np.zeros(n),
        "distance": np.full(n, 4000.0),
        "offset_x": np.zeros(n),
        "offset_y": np.zeros(n),
        "margin": np.full(n, 0.25),
        "jitter": np.zeros((n, 2)),
        "gain": np.ones(n),
        "sides_swapped": np.zeros(n, bool) if swapped is None else np.asarray(swapped),
    }


def upper_arm_colour(image, j2, shoulder, elbow):
    """(r, b) mean of the 3 x 3 pixels at the middle of the upper arm."""
    x, y = ((j2[shoulder] + j2[elbow]) / 2).astype(int)
    r, _, b = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float).mean(axis=0)
    return r, b


def test_side_colours_follow_sides_swapped_and_chirality_is_kept():
    bodies = [synth.make_body("S1", seed=0)]
    out = synth.render_scenes(
        standing_scenes([0.0, np.pi, 0.0, np.pi], [False, False, True, True]),
        bodies,
        np.random.default_rng(0),
    )
    j2 = out["joints_2d"]
    # facing the camera (yaw 0): the subject's left shoulder appears on the image's right
    assert j2[0, 11, 0] > j2[0, 14, 0] + 10
    assert j2[1, 11, 0] < j2[1, 14, 0] - 10  # seen from behind: on the left
    assert out["joints_3d"][0, 11, 0] > out["joints_3d"][0, 14, 0]  # camera x: right
    for k in range(4):
        left_warm = k < 2  # the first two keep the warm colour on the left, the last two swap
        for shoulder, elbow, warm in ((11, 12, left_warm), (14, 15, not left_warm)):
            r, b = upper_arm_colour(out["images"][k], j2[k], shoulder, elbow)
            assert (r > b + 40) if warm else (b > r + 40), (k, shoulder, r, b)


@pytest.mark.parametrize("side_colours", synth.SIDE_COLOURS)
def test_flipped_sample_looks_like_an_unflipped_one(side_colours):
    """The flip augmentation mirrors the image and swaps left and right labels. It is honest only
    if what a labelled side looks like does not change under it: the share of samples whose
    labelled left upper arm is warm must be the same with and without the flip. That holds with
    side colours drawn per sample; with fixed side colours it fails (about 78 % vs 5 %), which is
    why such files say mirror_consistent = false and are trained without flip. 400 samples; the
    binomial standard deviation of a share near 1/2 is 2.5 points, so 10 points is a 4-sigma
    tolerance for a fixed seed."""
    rng = np.random.default_rng(11)
    bodies = [synth.make_body(s, seed=0) for s in synth.TRAIN_SUBJECTS]
    scenes = synth.sample_scenes(rng, bodies, 400)
    if side_colours == "fixed":
        scenes["sides_swapped"][:] = False  # as write_synthetic_split does
    out = synth.render_scenes(scenes, bodies, rng)
    images, j2 = out["images"], out["joints_2d"]
    # the flip augmentation (raypose.data.dataset.augment_batch): columns reversed, x -> W - x, and
    # left and right joints swapped
    flipped = images[:, :, ::-1]
    f2 = j2[:, H36M_SKELETON.flip_permutation()].copy()
    f2[..., 0] = images.shape[2] - f2[..., 0]

    def warm_share(imgs, joints):
        left, right = [], []
        for k in range(len(imgs)):
            for side, (shoulder, elbow) in ((left, (11, 12)), (right, (14, 15))):
                r, b = upper_arm_colour(imgs[k], joints[k], shoulder, elbow)
                if abs(r - b) > 40:  # the arm is visible there (not covered by the torso)
                    side.append(r > b)
        return np.mean(left), np.mean(right), len(left)

    left, right, seen = warm_share(images, j2)
    left_f, right_f, seen_f = warm_share(flipped, f2)
    assert seen > 200 and seen_f > 200
    if side_colours == "per-sample":
        assert 0.4 < left < 0.6 and 0.4 < right < 0.6
        assert abs(left - left_f) < 0.10 and abs(right - right_f) < 0.10, (
            left,
            left_f,
            right,
            right_f,
        )
    else:  # the labelled left arm is mostly warm, and mostly cool once flipped
        assert left > 0.7 and right < 0.3 and left_f < 0.3 and right_f > 0.7, (
            left,
            left_f,
            right,
            right_f,
        )


@pytest.mark.parametrize("side_colours", synth.SIDE_COLOURS)
def test_files_say_whether_flip_is_honest_and_training_follows(tmp_path, side_colours):
    from raypose.data.dataset import PoseDataset

    out = tmp_path / side_colours
    assert (
        cli.main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--train",
                "30",
                "--test",
                "10",
                "--seed",
                "3",
                "--side-colours",
                side_colours,
                "--no-progress",
            ]
        )
        == 0
    )
    consistent = side_colours == "per-sample"
    for split in ("train.h5", "test.h5"):
        assert validate_file(out / split)["mirror_consistent"] is consistent
        with h5py.File(out / split) as f:
            assert f.attrs["side_colours"] == side_colours
    ds = PoseDataset(out / "train.h5", augment=True, flip=True, seed=0)
    assert ds.flip is consistent and ds.augmentation.flip is consistent
    # with flip on, about half of the 30 samples come out mirrored; never with fixed side colours
    plain = PoseDataset(out / "train.h5", augment=True, flip=False, seed=0)
    batch, ref = ds.get_batch(list(range(30)), 0), plain.get_batch(list(range(30)), 0)
    mirrored = int((batch["joints_3d"][:, 11, 0] != ref["joints_3d"][:, 11, 0]).sum())
    assert (5 <= mirrored <= 25) if consistent else mirrored == 0, mirrored


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert (
        cli.main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--train",
                "60",
                "--test",
                "24",
                "--seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_generated_files(synth_dir):
    train = validate_file(synth_dir / "train.h5")
    test = validate_file(synth_dir / "test.h5")
    assert train["n"] == 60 and test["n"] == 24
    assert train["source"] == test["source"] == "synth"
    assert train["subjects"] == sorted(synth.TRAIN_SUBJECTS)
    assert test["subjects"] == sorted(synth.TEST_SUBJECTS)
    assert not set(train["subjects"]) & set(test["subjects"])
    assert train["actions"] == sorted(synth.ACTIONS)
    assert set(train["cameras"]) <= set(synth.CAMERAS)
    with h5py.File(synth_dir / "train.h5") as f, h5py.File(synth_dir / "test.h5") as g:
        images = f["images"][:]
        j2, j3 = f["joints_2d"][:], f["joints_3d"][:].astype(np.float64)
        cameras, frames = f["camera"].asstr()[:], f["frame"][:]
        actions = f["action"].asstr()[:]
        # different random streams: no test pose or image repeats a training one
        assert not {a.tobytes() for a in g["images"][:]} & {a.tobytes() for a in images}
        assert not {a.tobytes() for a in g["joints_3d"][:]} & {
            a.tobytes() for a in f["joints_3d"][:]
        }
    # every joint inside the crop, with a margin
    assert j2.min() > 3 and j2.max() < 125
    assert (np.unique(actions, return_counts=True)[1] == 10).all()  # balanced actions
    assert ((frames >= 0) & (frames < 1000)).all() and len(set(frames)) > 40
    assert (j3[:, 0, 2] > 3400).all() and (j3[:, 0, 2] < 6600).all()  # 3.5 to 6.5 m away
    # Human3.6M-like bones: thigh ~ 446 mm, varied per subject
    thigh = np.linalg.norm(j3[:, 2] - j3[:, 1], axis=-1)
    assert 370 < thigh.min() and thigh.max() < 530 and thigh.std() > 5
    # 2D joints are the recorded camera's projection of the 3D joints, scaled and moved into the crop
    for k in range(len(j2)):
        (fx, fy), (cx, cy) = synth.CAMERAS[cameras[k]]
        uv = np.stack(
            [fx * j3[k, :, 0] / j3[k, :, 2] + cx, fy * j3[k, :, 1] / j3[k, :, 2] + cy], -1
        )
        design = np.concatenate([uv.reshape(-1, 1), np.tile(np.eye(2), (17, 1))], axis=1)
        fit, *_ = np.linalg.lstsq(design, j2[k].reshape(-1), rcond=None)
        assert np.abs(design @ fit - j2[k].reshape(-1)).max() < 0.01
    assert images.std() > 30  # not blank


def test_same_seed_same_data_and_splits_differ(tmp_path, synth_dir):
    result = synth.synthesize(tmp_path, 60, 24, seed=3, progress=False)
    assert result["n_train"] == 60 and result["images_per_s"] > 0
    with h5py.File(result["train"]) as a, h5py.File(synth_dir / "train.h5") as b:
        np.testing.assert_array_equal(a["images"][:5], b["images"][:5])
        np.testing.assert_array_equal(a["joints_3d"][:], b["joints_3d"][:])


def test_sample_grid_png(synth_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert (
        cli.main(
            [
                "data",
                "samples",
                "--data",
                str(synth_dir / "train.h5"),
                "--out",
                str(out),
                "--n",
                "4",
                "--skeleton",
            ]
        )
        == 0
    )
    with Image.open(out) as image:
        assert image.size == (2 * 256, 2 * 256)
