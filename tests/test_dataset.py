"""PoseDataset: targets, augmentation, flip, sharding, bad input and pickling, on tiny hand-made
files whose pixels encode their own coordinates."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from raypose.dataset import (IMAGE_MEAN, IMAGE_STD, PoseDataset, detection_targets, flip_sample,
                             iterate_batches, shard_positions)
from raypose.h5schema import KEYS, DataError, write_split
from raypose.skeleton import H36M_SKELETON, OFFSET_SCALE_MM, parent_relative

N = 12


def coordinate_images(n: int) -> np.ndarray:
    """Red = 2 * column, green = 2 * row, blue = 10 * sample: a crop reveals where it was taken."""
    rows, cols = np.mgrid[0:128, 0:128]
    images = np.zeros((n, 128, 128, 3), np.uint8)
    images[..., 0] = 2 * cols
    images[..., 1] = 2 * rows
    images[..., 2] = (10 * np.arange(n))[:, None, None]
    return images


def pose_arrays(n: int) -> dict:
    rng = np.random.default_rng(3)
    joints_3d = rng.normal(0, 250, (n, 17, 3)) + [100, -200, 4500]
    return {
        "images": coordinate_images(n),
        "joints_3d": joints_3d.astype(np.float32),
        "joints_2d": rng.uniform(20, 108, (n, 17, 2)).astype(np.float32),
        "subject": ["S1", "S5", "S8"] * (n // 3),
        "action": ["walk", "sit", "wave", "walk"] * (n // 4),
        "camera": ["54138969"] * n,
        "frame": np.arange(n, dtype=np.int32),
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dataset") / "train.h5"
    arrays = pose_arrays(N)
    write_split(path, source="synth", **arrays)
    return path, arrays


def pixels(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) values on the 0..255 scale."""
    x = image.permute(1, 2, 0).numpy() * IMAGE_STD + IMAGE_MEAN
    return x * 255.0


# ---------------------------------------------------------------------------------------------
# pure functions


def test_detection_targets_hand_computed():
    joints = np.zeros((1, 17, 2), np.float32)
    joints[0, 0] = (45.5, 12.5)  # columns c with 10c <= 45.5 < 10c + 30: 2, 3, 4; rows: 0, 1
    joints[0, 1] = (0.0, 0.0)  # only window (0, 0)
    joints[0, 2] = (111.9, 111.9)  # only the last window (90..120 covers it)
    joints[0, 3] = (30.0, 5.0)  # 30 is outside window 0 ([0, 30)): columns 1, 2, 3; row 0
    joints[0, 4] = (-0.1, 50.0)  # left of the crop: nothing
    joints[0, 5] = (112.0, 50.0)  # right of the crop, though window 9 reaches 120: nothing
    joints[0, 6] = (50.0, 130.0)  # below the crop
    joints[0, 7] = (55.0, 55.0)  # the usual 3 x 3 block: columns and rows 3, 4, 5
    h = detection_targets(joints)
    assert h.shape == (1, 17, 100) and h.dtype == np.float32
    lit = [sorted(np.flatnonzero(h[0, j]).tolist()) for j in range(7)]
    assert lit[0] == [2, 3, 4, 12, 13, 14]
    assert lit[1] == [0]
    assert lit[2] == [99]
    assert lit[3] == [1, 2, 3]
    assert lit[4] == lit[5] == lit[6] == []
    assert sorted(np.flatnonzero(h[0, 7]).tolist()) == [33, 34, 35, 43, 44, 45, 53, 54, 55]
    assert h[0, 8:].sum() == 9  # joints 8..16 sit at the origin: window 0 each


def test_flip_swaps_left_right_and_mirrors_x():
    image = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    j2 = np.zeros((17, 2), np.float32)
    j3 = np.zeros((17, 3), np.float32)
    j2[1] = (10, 20)  # RHip
    j2[4] = (30, 21)  # LHip
    j3[1] = (100, 5, 4000)
    j3[4] = (-80, 6, 4100)
    j3[10] = (7, -600, 4050)  # Head: centre joint, only mirrored
    flipped, f2, f3 = flip_sample(image, j2, j3)
    np.testing.assert_array_equal(flipped[:, 0], image[:, 3])  # first column <- last column
    # with the image 4 pixels wide, x -> 4 - x; LHip is the mirrored old RHip and vice versa
    np.testing.assert_allclose(f2[4], (4 - 10, 20))
    np.testing.assert_allclose(f2[1], (4 - 30, 21))
    np.testing.assert_allclose(f3[4], (-100, 5, 4000))
    np.testing.assert_allclose(f3[1], (80, 6, 4100))
    np.testing.assert_allclose(f3[10], (-7, -600, 4050))
    # on the 112 crop (no image given): x -> 112 - x
    _, g2, _ = flip_sample(None, j2, j3)
    np.testing.assert_allclose(g2[4], (102, 20))
    # twice is the identity
    back, b2, b3 = flip_sample(*flip_sample(image, j2, j3))
    np.testing.assert_array_equal(back, image)
    np.testing.assert_allclose(b2, j2)
    np.testing.assert_allclose(b3, j3)


def test_shards_equal_and_disjoint():
    shards = [shard_positions(10, True, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 10 padded to 12 by wrapping
    assert set(np.concatenate(shards)) == set(range(10))
    dropped = [shard_positions(10, True, 1, 0, r, 3, drop_last=True) for r in range(3)]
    assert [len(s) for s in dropped] == [3, 3, 3]
    assert len(set(np.concatenate(dropped))) == 9
    np.testing.assert_array_equal(shard_positions(10, True, 1, 0), shard_positions(10, True, 1, 0))
    assert not np.array_equal(shard_positions(10, True, 1, 0), shard_positions(10, True, 1, 1))
    np.testing.assert_array_equal(shard_positions(5, False, 1, 0, 1, 2), [1, 3, 0])


# ---------------------------------------------------------------------------------------------
# the dataset


def test_batch_without_augmentation(data_file):
    path, arrays = data_file
    ds = PoseDataset(path)
    assert len(ds) == N and ds.indices.dtype == np.int64
    assert ds.action_names == ["sit", "walk", "wave"]
    assert ds.joint_names == list(H36M_SKELETON.names)
    batch = ds.get_batch([5, 2])
    assert batch["image"].shape == (2, 3, 112, 112) and batch["image"].dtype == torch.float32
    assert batch["offsets"].shape == (2, 17, 3) and batch["detection"].shape == (2, 17, 100)
    assert batch["action"].dtype == torch.int64
    px = pixels(batch["image"][0])
    # centre crop at offset 8: crop pixel (0, 0) is image pixel (8, 8)
    np.testing.assert_allclose(px[0, 0], [16, 16, 50], atol=0.01)
    np.testing.assert_allclose(px[111, 111], [2 * 119, 2 * 119, 50], atol=0.01)
    np.testing.assert_allclose(batch["joints_2d"][0], arrays["joints_2d"][5] - 8, atol=1e-5)
    np.testing.assert_array_equal(batch["detection"][0], detection_targets(arrays["joints_2d"][5:6] - 8)[0])
    j3 = arrays["joints_3d"][2].astype(np.float64)
    np.testing.assert_allclose(batch["joints_3d"][1], j3 - j3[0], atol=1e-3)
    np.testing.assert_allclose(batch["offsets"][1], parent_relative(j3) / OFFSET_SCALE_MM, atol=1e-6)
    # offsets of the Head are the Head minus the Neck, scaled; the root's offset is 0
    np.testing.assert_allclose(batch["offsets"][1, 10], (j3[10] - j3[9]) / 1200, atol=1e-6)
    np.testing.assert_allclose(batch["offsets"][1, 0], 0)
    assert [ds.action_names[a] for a in batch["action"]] == [arrays["action"][5], arrays["action"][2]]
    item = ds[5]
    assert item["image"].shape == (3, 112, 112)
    torch.testing.assert_close(item["image"], batch["image"][0])


def test_augmentation_moves_joints_with_the_crop(data_file):
    path, arrays = data_file
    ds = PoseDataset(path, augment=True, color_noise=0.0, flip=False, seed=7)
    positions = np.arange(N)
    batch = ds.get_batch(positions, epoch=3)
    offsets = []
    for k in positions:
        px = pixels(batch["image"][k])
        ox, oy = px[0, 0, 0] / 2, px[0, 0, 1] / 2  # the crop's top-left image pixel
        assert ox == pytest.approx(round(ox), abs=0.01) and oy == pytest.approx(round(oy), abs=0.01)
        ox, oy = round(ox), round(oy)
        assert 0 <= ox <= 16 and 0 <= oy <= 16
        offsets.append((ox, oy))
        np.testing.assert_allclose(px[5, 9, :2], [2 * (ox + 9), 2 * (oy + 5)], atol=0.01)
        np.testing.assert_allclose(batch["joints_2d"][k], arrays["joints_2d"][k] - [ox, oy], atol=1e-5)
        expected = detection_targets(arrays["joints_2d"][k:k + 1] - np.float32([ox, oy]))[0]
        np.testing.assert_array_equal(batch["detection"][k].numpy(), expected)
    assert len(set(offsets)) > 6  # the crops really vary
    # deterministic in (seed, epoch, position), whatever the batch
    again = ds.get_batch(positions[::-1], epoch=3)
    torch.testing.assert_close(again["image"], batch["image"].flip(0))
    torch.testing.assert_close(ds.get_batch([4], epoch=3)["joints_2d"][0], batch["joints_2d"][4])
    other = ds.get_batch(positions, epoch=4)
    assert not torch.equal(other["joints_2d"], batch["joints_2d"])
    reseeded = PoseDataset(path, augment=True, color_noise=0.0, flip=False, seed=8).get_batch(positions, 3)
    assert not torch.equal(reseeded["joints_2d"], batch["joints_2d"])


def test_augmentation_flip_and_colour_noise(data_file):
    path, arrays = data_file
    ds = PoseDataset(path, augment=True, color_noise=0.0, flip=True, seed=1)
    batch = ds.get_batch(np.arange(N), epoch=0)
    perm = H36M_SKELETON.flip_permutation()
    n_flipped = 0
    for k in range(N):
        px = pixels(batch["image"][k])
        flipped = px[0, 0, 0] > px[0, 111, 0]  # columns run backwards
        ox, oy = round(min(px[0, 0, 0], px[0, 111, 0]) / 2), round(px[0, 0, 1] / 2)
        j2 = arrays["joints_2d"][k] - np.float32([ox, oy])
        j3 = arrays["joints_3d"][k].astype(np.float64)
        if flipped:
            n_flipped += 1
            j2 = j2[perm]
            j2[:, 0] = 112 - j2[:, 0]
            j3 = j3[perm] * [-1, 1, 1]
        np.testing.assert_allclose(batch["joints_2d"][k], j2, atol=1e-4)
        np.testing.assert_allclose(batch["joints_3d"][k], j3 - j3[0], atol=1e-3)
        np.testing.assert_array_equal(batch["detection"][k].numpy(), detection_targets(j2[None])[0])
    assert 2 <= n_flipped <= N - 2
    # colour noise: one RGB shift per sample, the same at every pixel
    plain = PoseDataset(path, augment=True, color_noise=0.0, flip=False, seed=5).get_batch([0, 1], 2)
    noisy = PoseDataset(path, augment=True, color_noise=0.1, flip=False, seed=5).get_batch([0, 1], 2)
    shift = pixels(noisy["image"][0]) - pixels(plain["image"][0])
    assert np.ptp(shift.reshape(-1, 3), axis=0).max() < 1e-3
    assert 0.05 < np.abs(shift[0, 0]).max() < 60  # on the 0..255 scale
    assert not np.allclose(shift[0, 0], (pixels(noisy["image"][1]) - pixels(plain["image"][1]))[0, 0])


def test_filters_and_helpers(data_file):
    path, arrays = data_file
    ds = PoseDataset(path, subjects=["S1", "S8"], actions=["walk"])
    expected = [i for i in range(N) if arrays["subject"][i] in ("S1", "S8") and arrays["action"][i] == "walk"]
    np.testing.assert_array_equal(ds.indices, expected)
    held_out = PoseDataset(path, exclude_subjects=["S8"])
    assert "S8" not in held_out.subjects and len(held_out) == 8
    assert len(PoseDataset(path, max_samples=5)) == 5
    poses = held_out.root_relative_poses()
    assert poses.shape == (8, 17, 3) and poses.dtype == np.float64
    np.testing.assert_allclose(poses[:, 0], 0)
    j3 = arrays["joints_3d"][held_out.indices].astype(np.float64)
    np.testing.assert_allclose(poses, j3 - j3[:, :1], atol=1e-3)


def test_iterate_batches_cover_the_shard(data_file):
    path, _ = data_file
    ds = PoseDataset(path, augment=True)
    rows = []
    for rank in range(2):
        batches = list(iterate_batches(ds, batch_size=4, shuffle=True, seed=0, epoch=1, rank=rank, world_size=2))
        assert [len(b["image"]) for b in batches] == [4, 2]
        rows.append(torch.cat([b["row"] for b in batches]).tolist())
    assert sorted(rows[0] + rows[1]) == list(range(N))
    threaded = list(iterate_batches(ds, 4, True, 0, 1, rank=0, world_size=2, prefetch=2))
    plain = list(iterate_batches(ds, 4, True, 0, 1, rank=0, world_size=2))
    for a, b in zip(threaded, plain, strict=True):
        torch.testing.assert_close(a["image"], b["image"])
    assert [len(b["image"]) for b in iterate_batches(ds, 5, False, 0, 0, drop_last=True)] == [5, 5]


def test_pickles_without_handle_and_reopens(data_file):
    path, _ = data_file
    ds = PoseDataset(path, augment=True)
    first = ds.get_batch([3, 1], epoch=2)  # opens the handle and reads the poses
    assert isinstance(ds._file, h5py.File)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # no images, poses or handle inside
    clone = pickle.loads(blob)
    assert clone._file is None and clone._pose_cache is None
    assert isinstance(ds._file, h5py.File) and ds._file.id.valid  # the original keeps its handle
    again = clone.get_batch([3, 1], epoch=2)
    assert clone._file is not None and clone._file.id.valid
    for key in first:
        torch.testing.assert_close(again[key], first[key])


# ---------------------------------------------------------------------------------------------
# bad input: one clear DataError naming the file and the key


def _corrupt(path, kind):
    with h5py.File(path, "a") as f:
        if kind == "missing key":
            del f["camera"]
        elif kind == "wrong shape":
            del f["joints_2d"]
            f["joints_2d"] = np.zeros((N, 17, 3), np.float32)
        elif kind == "wrong dtype":
            del f["joints_3d"]
            f["joints_3d"] = np.zeros((N, 17, 3), np.float64)
        elif kind == "nan":
            f["joints_2d"][4, 2, 0] = np.nan
        elif kind == "empty":
            for key in KEYS:
                f[key].resize(0, axis=0)


@pytest.mark.parametrize("kind, message", [
    ("missing key", r"key 'camera': dataset missing"),
    ("wrong shape", r"key 'joints_2d': expected shape \(N, 17, 2\), got \(12, 17, 3\)"),
    ("wrong dtype", r"key 'joints_3d': expected dtype float32, got float64"),
    ("nan", r"key 'joints_2d': NaN or inf in row 4"),
    ("empty", r"key 'images': file is empty"),
])
def test_bad_file(tmp_path, kind, message):
    path = tmp_path / "bad.h5"
    write_split(path, **pose_arrays(N))
    _corrupt(path, kind)
    with pytest.raises(DataError, match=r"bad\.h5: " + message):
        PoseDataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.h5: file not found.*'images'"):
        PoseDataset(tmp_path / "absent.h5")


def test_empty_selection(data_file):
    path, _ = data_file
    with pytest.raises(DataError, match=r"no samples in .*train\.h5 for subjects=\['S9'\].*'subject'"):
        PoseDataset(path, subjects=["S9"])
    with pytest.raises(DataError, match=r"train\.h5 for exclude_subjects=.*, actions=\['run'\]"):
        PoseDataset(path, exclude_subjects=["S1"], actions=["run"])
