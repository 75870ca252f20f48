"""PoseDataset: targets, augmentation, flip, sharding, bad input and pickling, on tiny hand-made
files whose pixels encode their own coordinates; the device path against a numpy reference; crops
that keep every joint on synthetic and converted Human3.6M data."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from raypose.data.dataset import (
    CROP_SIZE,
    IMAGE_MEAN,
    IMAGE_STD,
    MAX_OFFSET,
    PoseDataset,
    augmentation_draws,
    detection_targets,
    epoch_order,
    epoch_positions,
    iterate_batches,
    shard_positions,
)
from raypose.data.schema import KEYS, DataError, write_split
from raypose.data.skeleton import H36M_SKELETON, OFFSET_SCALE_MM, parent_relative

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
# the numpy reference of a training batch: per-sample loops, written for reading, not for speed.
# Training uses raypose.data.dataset.augment_batch (torch, on the device); the two must agree.


def flip_sample(image, joints_2d, joints_3d, skeleton=H36M_SKELETON):
    """Left/right mirror: image (..., H, W, C) or None; joints_2d x -> W - x; joints_3d x -> -x;
    left and right joints swapped. W is the crop width when image is None."""
    perm = skeleton.flip_permutation()
    width = 112 if image is None else image.shape[-2]
    j2 = np.array(joints_2d, dtype=np.float32)[..., perm, :]
    j2[..., 0] = width - j2[..., 0]
    j3 = np.array(joints_3d, dtype=np.float32)[..., perm, :]
    j3[..., 0] = -j3[..., 0]
    return (None if image is None else image[..., ::-1, :]), j2, j3


def reference_crop_offset(joints_2d, u):
    """One sample's (ox, oy): uniform over the offsets that keep every joint in the crop, else
    the middle of the closest ones."""
    offset = []
    for axis in range(2):
        lo = min(max(int(np.floor(joints_2d[:, axis].max())) - 111, 0), 16)
        hi = min(max(int(np.floor(joints_2d[:, axis].min())), 0), 16)
        if lo <= hi:
            offset.append(lo + min(int(np.floor(u[axis] * (hi - lo + 1))), hi - lo))
        else:
            offset.append((lo + hi) // 2)
    return np.array(offset)


def reference_normals(u):
    """Box-Muller, as the library draws them: (4,) uniforms -> (3,) standard normals."""
    r1, r2 = np.sqrt(-2 * np.log(u[0])), np.sqrt(-2 * np.log(u[2]))
    return np.array(
        [
            r1 * np.cos(2 * np.pi * u[1]),
            r1 * np.sin(2 * np.pi * u[1]),
            r2 * np.cos(2 * np.pi * u[3]),
        ]
    )


def reference_batch(ds: PoseDataset, positions, epoch: int) -> dict:
    aug = ds.augmentation
    positions = np.asarray(positions)
    rows = ds.indices[positions]
    with h5py.File(ds.path, "r") as f:
        images = np.stack([f["images"][r] for r in rows])
        joints_2d_box = np.stack([f["joints_2d"][r] for r in rows])
        joints_3d_all = np.stack([f["joints_3d"][r] for r in rows])
    draws = augmentation_draws(ds.seed, epoch, positions).astype(np.float64)
    out = {k: [] for k in ("image", "offsets", "detection", "joints_3d", "joints_2d")}
    for k in range(len(positions)):
        if aug.augment:
            ox, oy = reference_crop_offset(joints_2d_box[k], draws[k, 0:2])
            flip = aug.flip and draws[k, 2] < 0.5
            alpha = reference_normals(draws[k, 3:7]) * aug.color_noise
        else:
            ox = oy = 8
            flip, alpha = False, np.zeros(3)
        crop = images[k, oy : oy + 112, ox : ox + 112]
        j2 = joints_2d_box[k] - np.float32([ox, oy])
        j3 = joints_3d_all[k]
        if flip:
            crop, j2, j3 = flip_sample(crop, j2, j3)
        noise = aug.rgb_eigvec @ (alpha * aug.rgb_eigval)  # (3,) on the [0, 1] scale
        image = (crop / 255.0 + noise - IMAGE_MEAN) / IMAGE_STD  # (112, 112, 3)
        out["image"].append(image.transpose(2, 0, 1))
        out["offsets"].append(parent_relative(j3.astype(np.float64)) / OFFSET_SCALE_MM)
        out["detection"].append(reference_detection_targets(j2))
        out["joints_3d"].append(j3 - j3[0])  # float32 mm, as the batch holds them
        out["joints_2d"].append(j2)
    return {k: np.stack(v) for k, v in out.items()}


def reference_detection_targets(joints_2d):
    """(17, 2) crop pixels -> (17, 100): window (r, c) covers [10c, 10c + 30) x [10r, 10r + 30)."""
    h = np.zeros((17, 100), np.float32)
    for j, (x, y) in enumerate(joints_2d):
        if not (0 <= x < 112 and 0 <= y < 112):
            continue
        for r in range(10):
            for c in range(10):
                h[j, 10 * r + c] = 10 * c <= x < 10 * c + 30 and 10 * r <= y < 10 * r + 30
    return h


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
    h = detection_targets(joints).numpy()
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
    # the reference's mirror, by hand; the device path must then agree with the reference
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
    # contiguous slices of the epoch's order, the padding wrapping around to its start
    np.testing.assert_array_equal(shard_positions(5, False, 1, 0, 1, 2), [3, 4, 0])


def test_epoch_samples_take_new_samples_each_epoch():
    # 10 positions, 3 per epoch: 3 disjoint epochs per pass, then a new pass in a new order
    epochs = [epoch_positions(10, True, seed=1, epoch=e, epoch_samples=3) for e in range(6)]
    assert [len(e) for e in epochs] == [3] * 6
    first_pass = epoch_order(10, True, 1, 0)
    np.testing.assert_array_equal(np.concatenate(epochs[:3]), first_pass[:9])
    assert len(set(np.concatenate(epochs[:3]))) == 9
    np.testing.assert_array_equal(np.concatenate(epochs[3:]), epoch_order(10, True, 1, 1)[:9])
    # 0, or at least the whole split: every position every epoch, as without the setting
    for m in (0, 10, 11):
        np.testing.assert_array_equal(
            epoch_positions(10, True, 1, 4, m), epoch_order(10, True, 1, 4)
        )
    # shards split the epoch's slice: 2 ranks of 4 positions each from 8 per epoch of 20
    shards = [
        shard_positions(20, True, 2, 1, r, 2, drop_last=True, epoch_samples=8) for r in range(2)
    ]
    assert [len(s) for s in shards] == [4, 4]
    np.testing.assert_array_equal(np.concatenate(shards), epoch_order(20, True, 2, 0)[8:16])


def test_training_epochs_follow_epoch_samples(data_file):
    # the training loop's batches (raypose.train.loop.epoch_batches) read the config's epoch_samples
    from raypose.config import Config
    from raypose.train.loop import epoch_batches

    cfg = Config()
    cfg.data.batch_size, cfg.data.epoch_samples = 2, 4  # 3 epochs per pass over N = 12
    ds = PoseDataset(data_file[0], augment=False)
    rows = [np.concatenate([b["row"].numpy() for b in epoch_batches(ds, cfg, e)]) for e in range(2)]
    assert [len(r) for r in rows] == [4, 4]
    assert not set(rows[0]) & set(rows[1])  # two epochs of one pass: new samples
    np.testing.assert_array_equal(
        np.concatenate(rows), ds.indices[epoch_order(len(ds), True, 0, 0)[:8]]
    )


def test_epoch_order_shuffles_blocks_and_within_buffers():
    order = epoch_order(1000, True, seed=3, epoch=2, block=10, buffer_blocks=4)
    assert sorted(order.tolist()) == list(range(1000))
    np.testing.assert_array_equal(order, epoch_order(1000, True, 3, 2, 10, 4))
    assert not np.array_equal(order, epoch_order(1000, True, 3, 3, 10, 4))
    # each run of 40 positions holds exactly 4 whole blocks of 10: read as at most 4 runs
    for start in range(0, 1000, 40):
        blocks = np.unique(order[start : start + 40] // 10)
        assert len(blocks) == 4 and sorted(order[start : start + 40].tolist()) == sorted(
            (blocks[:, None] * 10 + np.arange(10)).ravel().tolist()
        )
    assert np.mean(np.abs(np.diff(order[:40])) == 1) < 0.3  # shuffled inside the buffer
    np.testing.assert_array_equal(epoch_order(7, False, 0, 0), np.arange(7))


def test_draws_are_a_function_of_seed_epoch_position():
    a = augmentation_draws(1, 2, [5, 9, 100])
    assert a.shape == (3, 7) and a.dtype == np.float32 and (a > 0).all() and (a < 1).all()
    np.testing.assert_array_equal(augmentation_draws(1, 2, [100, 5])[0], a[2])
    assert not np.array_equal(augmentation_draws(1, 3, [5]), a[:1])
    assert not np.array_equal(augmentation_draws(2, 2, [5]), a[:1])
    many = augmentation_draws(0, 0, np.arange(20000))
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.std() - np.sqrt(1 / 12)) < 0.01


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
    np.testing.assert_array_equal(
        batch["detection"][0], detection_targets(arrays["joints_2d"][5:6] - 8)[0]
    )
    j3 = arrays["joints_3d"][2].astype(np.float64)
    np.testing.assert_allclose(batch["joints_3d"][1], j3 - j3[0], atol=1e-3)
    np.testing.assert_allclose(
        batch["offsets"][1], parent_relative(j3) / OFFSET_SCALE_MM, atol=1e-6
    )
    # offsets of the Head are the Head minus the Neck, scaled; the root's offset is 0
    np.testing.assert_allclose(batch["offsets"][1, 10], (j3[10] - j3[9]) / 1200, atol=1e-6)
    np.testing.assert_allclose(batch["offsets"][1, 0], 0)
    assert [ds.action_names[a] for a in batch["action"]] == [
        arrays["action"][5],
        arrays["action"][2],
    ]
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
        np.testing.assert_allclose(
            batch["joints_2d"][k], arrays["joints_2d"][k] - [ox, oy], atol=1e-5
        )
        expected = detection_targets(arrays["joints_2d"][k : k + 1] - np.float32([ox, oy]))[0]
        np.testing.assert_array_equal(batch["detection"][k].numpy(), expected)
    assert len(set(offsets)) > 6  # the crops really vary
    # deterministic in (seed, epoch, position), whatever the batch
    again = ds.get_batch(positions[::-1], epoch=3)
    torch.testing.assert_close(again["image"], batch["image"].flip(0))
    torch.testing.assert_close(ds.get_batch([4], epoch=3)["joints_2d"][0], batch["joints_2d"][4])
    other = ds.get_batch(positions, epoch=4)
    assert not torch.equal(other["joints_2d"], batch["joints_2d"])
    reseeded = PoseDataset(path, augment=True, color_noise=0.0, flip=False, seed=8).get_batch(
        positions, 3
    )
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
    plain = PoseDataset(path, augment=True, color_noise=0.0, flip=False, seed=5).get_batch(
        [0, 1], 2
    )
    noisy = PoseDataset(path, augment=True, color_noise=0.1, flip=False, seed=5).get_batch(
        [0, 1], 2
    )
    shift = pixels(noisy["image"][0]) - pixels(plain["image"][0])
    assert np.ptp(shift.reshape(-1, 3), axis=0).max() < 1e-3
    assert 0.05 < np.abs(shift[0, 0]).max() < 60  # on the 0..255 scale
    assert not np.allclose(
        shift[0, 0], (pixels(noisy["image"][1]) - pixels(plain["image"][1]))[0, 0]
    )


def test_device_path_matches_the_numpy_reference(data_file):
    path, _ = data_file
    positions = np.array([7, 0, 11, 3, 3, 5, 9, 1])
    for augment, noise, flip, seed, epoch in [
        (True, 0.1, True, 4, 2),
        (True, 0.3, True, 9, 0),
        (True, 0.1, False, 1, 5),
        (False, 0.1, True, 0, 0),
    ]:
        ds = PoseDataset(path, augment=augment, color_noise=noise, flip=flip, seed=seed)
        expected = reference_batch(ds, positions, epoch)
        for channels_last in (False, True):
            batch = ds.get_batch(positions, epoch=epoch, channels_last=channels_last)
            assert batch["image"].is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            for key, value in expected.items():
                np.testing.assert_allclose(
                    batch[key].numpy(),
                    value,
                    atol=1e-5,
                    rtol=0,
                    err_msg=f"{key} (augment={augment}, flip={flip})",
                )
        np.testing.assert_array_equal(batch["row"].numpy(), ds.indices[positions])
        if augment and flip:
            assert (
                0
                < (
                    batch["joints_2d"][:, 1, 0]
                    != torch.from_numpy(
                        reference_batch(
                            PoseDataset(path, augment=True, flip=False, seed=seed), positions, epoch
                        )["joints_2d"][:, 1, 0]
                    )
                ).sum()
            )
    # the threaded, windowed reader gives the same batches as one get_batch per chunk
    ds = PoseDataset(path, augment=True, seed=2)
    for prefetch in (0, 2):
        batches = list(iterate_batches(ds, 5, shuffle=True, seed=2, epoch=1, prefetch=prefetch))
        order = shard_positions(N, True, 2, 1)
        for k, batch in enumerate(batches):
            single = ds.get_batch(order[5 * k : 5 * k + 5], epoch=1)
            for key in single:
                torch.testing.assert_close(batch[key], single[key])


def share_of_crops_losing_a_joint(ds: PoseDataset, epochs: int) -> float:
    lost = total = 0
    for epoch in range(epochs):
        for batch in iterate_batches(ds, 64, shuffle=True, seed=0, epoch=epoch, prefetch=0):
            j2 = batch["joints_2d"]
            inside = ((j2 >= 0) & (j2 < CROP_SIZE)).all(dim=-1).all(dim=-1)  # (B,)
            lost += int((~inside).sum())
            total += len(inside)
    return lost / total


def share_losing_with_any_offset(ds: PoseDataset) -> float:
    """The share a crop drawn uniformly from 0..16 on each axis (the old rule) would lose."""
    j2 = ds._poses()["joints_2d"]  # (N, 17, 2), 128 box
    offsets = np.arange(MAX_OFFSET + 1)
    keep = [
        ((j2[..., a, None] >= offsets) & (j2[..., a, None] < offsets + CROP_SIZE)).all(axis=1)
        for a in range(2)
    ]  # (N, 17 offsets) per axis
    return 1 - float((keep[0].mean(axis=1) * keep[1].mean(axis=1)).mean())


def test_training_crops_keep_every_joint_synthetic(tiny_data):
    ds = PoseDataset(tiny_data / "train.h5", augment=True, seed=0)
    share = share_of_crops_losing_a_joint(ds, epochs=10)
    assert share <= 0.01, (share, share_losing_with_any_offset(ds))
    val = PoseDataset(tiny_data / "train.h5", subjects=["S8"])  # the centre crop, as in validation
    assert share_of_crops_losing_a_joint(val, epochs=1) <= 0.01


def test_training_crops_keep_every_joint_h36m(tmp_path):
    from raypose.data.h36m import convert
    from tests.unit.test_h36m import CAM_A, CAM_B, write_sequence

    root = tmp_path / "processed"
    shifts = [(0, 0), (-50, -30), (20, 15), (-10, 25), (35, -20), (5, 5)]
    write_sequence(
        root,
        "S1",
        "Walking-1",
        [(CAM_A if i % 2 else CAM_B, i + 1, shift, 120) for i, shift in enumerate(shifts)],
    )
    write_sequence(root, "S9", "Directions-2", [(CAM_A, 1, (0, 0), 150)])
    result = convert(root, tmp_path / "out", progress=False)
    ds = PoseDataset(result["train"], augment=True, seed=0)
    assert share_losing_with_any_offset(ds) > 0.2  # what a crop anywhere in the box would lose
    assert share_of_crops_losing_a_joint(ds, epochs=100) <= 0.01


def test_crop_offsets_by_hand():
    from raypose.data.dataset import crop_offsets

    joints = torch.zeros((4, 17, 2))
    joints[0] = torch.tensor([10.5, 20.0])  # everything at one point: 0..10 in x, 0..16 in y
    joints[0, 1] = torch.tensor([115.2, 30.0])  # x reaches 115.2: ox >= 4
    joints[1, :, 0], joints[1, :, 1] = 3.0, 60.0
    joints[1, 1, 0] = (
        125.0  # x spans 3..125 (> 112): no offset keeps both, the middle (14 + 3) // 2
    )
    joints[2, :] = torch.tensor([-5.0, 130.0])  # outside the box: the nearest offsets, 0 and 16
    joints[3, :] = 64.0  # centred: any offset
    low = crop_offsets(joints, torch.full((4, 2), 1e-6))
    high = crop_offsets(joints, torch.full((4, 2), 1 - 1e-6))
    assert low.tolist() == [[4, 0], [8, 0], [0, 16], [0, 0]]
    assert high.tolist() == [[10, 16], [8, 16], [0, 16], [16, 16]]
    assert low.dtype == torch.int64


def test_filters_and_helpers(data_file):
    path, arrays = data_file
    ds = PoseDataset(path, subjects=["S1", "S8"], actions=["walk"])
    expected = [
        i
        for i in range(N)
        if arrays["subject"][i] in ("S1", "S8") and arrays["action"][i] == "walk"
    ]
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
        batches = list(
            iterate_batches(
                ds, batch_size=4, shuffle=True, seed=0, epoch=1, rank=rank, world_size=2
            )
        )
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


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing key", r"key 'camera': dataset missing"),
        ("wrong shape", r"key 'joints_2d': expected shape \(N, 17, 2\), got \(12, 17, 3\)"),
        ("wrong dtype", r"key 'joints_3d': expected dtype float32, got float64"),
        ("nan", r"key 'joints_2d': NaN or inf in row 4"),
        ("empty", r"key 'images': file is empty"),
    ],
)
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
    with pytest.raises(
        DataError, match=r"no samples in .*train\.h5 for subjects=\['S9'\].*'subject'"
    ):
        PoseDataset(path, subjects=["S9"])
    with pytest.raises(DataError, match=r"train\.h5 for exclude_subjects=.*, actions=\['run'\]"):
        PoseDataset(path, exclude_subjects=["S1"], actions=["run"])


def _split_folder(tmp_path, test_skeleton=H36M_SKELETON):
    """tmp_path/train.h5 and tmp_path/test.h5, written by raypose's writer."""
    write_split(tmp_path / "train.h5", source="synth", **pose_arrays(N))
    write_split(tmp_path / "test.h5", source="synth", skeleton=test_skeleton, **pose_arrays(N))
    return tmp_path / "train.h5", tmp_path / "test.h5"


def test_test_split_with_another_skeleton_is_refused_naming_both_files(tmp_path):
    from raypose.data.skeleton import Skeleton

    # the same joints with left and right swapped in the stored order
    names = list(H36M_SKELETON.names)
    names[1:4], names[4:7] = names[4:7], names[1:4]
    swapped = Skeleton(
        tuple(names), H36M_SKELETON.parents, H36M_SKELETON.joints_left, H36M_SKELETON.joints_right
    )
    train, test = _split_folder(tmp_path, test_skeleton=swapped)
    with pytest.raises(
        DataError,
        match=rf"{test}: key 'skeleton': differs from the skeleton of "
        rf"{train} \(names\[1\] is 'LHip' here and 'RHip' there\)",
    ):
        PoseDataset(test)
    PoseDataset(train)  # train.h5 is the reference, read on its own


def test_test_split_skeleton_changed_with_h5py_is_refused(tmp_path):
    import json

    train, test = _split_folder(tmp_path)
    assert len(PoseDataset(test)) == N  # the same skeleton: fine
    with h5py.File(test, "a") as f:
        skeleton = json.loads(f.attrs["skeleton"])
        skeleton["parents"][16] = 14
        f.attrs["skeleton"] = json.dumps(skeleton)
    with pytest.raises(DataError, match=rf"{test}: .*{train} \(parents\[16\] is 14 here and 15"):
        PoseDataset(test)
    # a test.h5 alone in its folder has no train.h5 to disagree with
    train.unlink()
    assert len(PoseDataset(test)) == N


def test_validation_selection_is_checked_against_the_summary_it_is_opened_with(tmp_path):
    import json

    from raypose.config import Config
    from raypose.data.schema import validate_file
    from raypose.train.loop import open_splits

    train, _ = _split_folder(tmp_path)
    info = validate_file(train)  # as the driver summarises train.h5 for every worker
    with h5py.File(train, "a") as f:
        skeleton = json.loads(f.attrs["skeleton"])
        skeleton["joints_left"], skeleton["joints_right"] = (
            skeleton["joints_right"],
            skeleton["joints_left"],
        )
        f.attrs["skeleton"] = json.dumps(skeleton)
    with pytest.raises(
        DataError,
        match=rf"{train}: key 'skeleton': differs from the skeleton of "
        rf"{train} \(joints_left\[0\]",
    ):
        PoseDataset(train, subjects=["S8"], info=info)
    cfg = Config()
    cfg.data.path = str(tmp_path)
    with pytest.raises(DataError, match=r"key 'skeleton'"):
        open_splits(cfg, info=info)
    # validated afresh, the file agrees with itself
    train_set, val_set = open_splits(cfg)
    assert len(val_set) == N // 3 and len(train_set) == N - N // 3
