"""The training split resident on the device against the host feed, on the CPU device: the same
batches for the same seed (images, targets, labels, bit for bit), because both take the same
positions and the same counter-based random numbers; and the host feed's second reader thread,
which must not change a batch or its order."""

import numpy as np
import pytest
import torch

from raypose.config import Config
from raypose.data.dataset import (
    PoseDataset,
    _read_in_turns,
    augmentation_draws,
    batch_chunks,
    device_batches,
    host_batches,
    iterate_batches,
    read_windows,
)
from raypose.data.resident import (
    RESIDENT_SAMPLE_BYTES,
    ResidentSplit,
    device_draws,
    iterate_resident,
    resident_batches,
    resident_bytes,
)
from raypose.train.loop import build_model, build_optimizer, epoch_batches, train_epoch

KEYS = ("image", "offsets", "detection", "joints_3d", "joints_2d", "action", "row")


@pytest.fixture(scope="module")
def mirrored_data(tmp_path_factory):
    """Synthetic data with side colours per sample, so that the flip runs too (80 training
    samples besides the validation subject S8)."""
    from raypose.data.synth import synthesize

    d = tmp_path_factory.mktemp("resident")
    synthesize(str(d), 100, 10, seed=1, progress=False, side_colours="per-sample")
    return d / "train.h5"


def _train_set(path, seed=3, **kwargs):
    return PoseDataset(path, exclude_subjects=["S8"], seed=seed, augment=True, **kwargs)


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in KEYS:
            # exact: the same uint8 pixels, poses and draws go through the same torch ops
            assert x[key].dtype == y[key].dtype, key
            assert x[key].stride() == y[key].stride(), key  # channels_last alike
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3), (2**32 - 1, 10**6)])
def test_device_draws_are_the_host_draws_bit_for_bit(seed, epoch):
    # positions beyond any file, and out of order: the hash has no state
    positions = np.concatenate([np.arange(0, 5000), [2**40, 17, 3, 2**62]])
    host = augmentation_draws(seed, epoch, positions)
    device = device_draws(seed, epoch, torch.from_numpy(positions)).numpy()
    assert device.dtype == np.float32 and device.shape == host.shape == (len(positions), 7)
    assert np.array_equal(device, host)
    assert 0 < device.min() and device.max() < 1


def test_resident_split_holds_the_files_samples(mirrored_data):
    train = _train_set(mirrored_data, max_samples=50)
    resident = ResidentSplit(train, "cpu")
    assert len(resident) == len(train) == 50
    rows = train.read_rows(train.indices)
    assert torch.equal(resident.images, torch.from_numpy(rows["images"]))
    assert torch.equal(resident.joints_3d, torch.from_numpy(rows["joints_3d"]))
    assert torch.equal(resident.row, torch.from_numpy(train.indices))
    # 128 * 128 * 3 bytes of image, 17 * 5 float32 of joints, two int64 per sample
    assert RESIDENT_SAMPLE_BYTES == 49152 + 340 + 16
    assert resident.nbytes == resident_bytes(50) == 50 * RESIDENT_SAMPLE_BYTES


@pytest.mark.parametrize(
    "rank, world_size, epoch_samples, channels_last",
    [(0, 1, 0, True), (1, 2, 0, False), (0, 1, 24, True)],
)
def test_resident_batches_are_the_host_feeds(
    mirrored_data, rank, world_size, epoch_samples, channels_last
):
    train = _train_set(mirrored_data)
    assert train.augmentation.augment and train.augmentation.flip  # every draw is used
    resident = ResidentSplit(train, "cpu")
    order = {
        "shuffle": True,
        "seed": 11,
        "rank": rank,
        "world_size": world_size,
        "drop_last": True,
        "channels_last": channels_last,
        "epoch_samples": epoch_samples,
    }
    for epoch in range(3):
        host = list(iterate_batches(train, 8, epoch=epoch, **order))
        on_device = list(iterate_resident(resident, 8, epoch=epoch, **order))
        _assert_same_batches(host, on_device)
    # and the draws did something: flips and crops differ between two epochs
    a = next(iter(iterate_resident(resident, 8, epoch=0, **order)))
    b = next(iter(iterate_resident(resident, 8, epoch=1, **order)))
    assert not torch.equal(a["image"], b["image"])


def test_resident_batches_without_augmentation_are_the_centre_crops(mirrored_data):
    val = PoseDataset(mirrored_data, subjects=["S8"], augment=False, seed=3)
    chunks = batch_chunks(np.arange(len(val)), 6)  # the last batch shorter, as validation's
    host = list(device_batches(val, chunks, epoch=0))
    _assert_same_batches(host, list(resident_batches(ResidentSplit(val, "cpu"), chunks, 0)))


def test_reader_threads_give_the_same_host_batches_in_order(mirrored_data):
    train = _train_set(mirrored_data)
    # 150 batches of 8 (positions drawn again and again from the 80): 1,200 samples, so three
    # read windows of up to READ_WINDOW = 512 samples, which the threads take in turns
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, len(train), 8) for _ in range(150)]
    groups = read_windows(chunks)
    assert [len(g) for g in groups] == [64, 64, 22]
    one = list(host_batches(train, chunks, 2))
    assert len(one) == 150
    # one: the single background reader of every training run; two: thread 0 takes windows 0 and
    # 2; three: one window each
    for readers in (1, 2, 3):
        turns = list(_read_in_turns(train, groups, 2, False, readers, 2))
        assert len(turns) == len(one)
        for x, y in zip(one, turns):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_device_batches_with_two_readers_are_those_of_one(mirrored_data):
    train = _train_set(mirrored_data)
    chunks = batch_chunks(np.random.default_rng(1).permutation(len(train)), 8, drop_last=True)
    one = list(device_batches(train, chunks, epoch=4, readers=1))
    _assert_same_batches(one, list(device_batches(train, chunks, epoch=4, readers=2)))


def test_a_reader_threads_error_reaches_the_loop(mirrored_data):
    train = _train_set(mirrored_data)
    # position 10_000 does not exist: the thread that reads it raises, the consumer re-raises
    chunks = [np.array([0, 1]), np.array([2, 3]), np.array([10_000])]
    with pytest.raises(IndexError, match="positions must lie in"):
        list(device_batches(train, chunks, epoch=0, readers=2, prefetch=1))


def test_training_on_resident_data_takes_the_same_steps(mirrored_data):
    """Three training steps from the same weights: the losses of the resident path and of the
    host feed are equal (float32 on the CPU, the same ops on the same inputs: exact)."""
    cfg = Config()
    cfg.data.batch_size = 8
    cfg.model.fc1_width = cfg.model.fc2_width = 32
    cfg.scaling.amp = False
    train = _train_set(mirrored_data, seed=cfg.seed)
    resident = ResidentSplit(train, "cpu")
    device = torch.device("cpu")
    losses = []
    for source in (None, resident):
        torch.manual_seed(0)
        model = build_model(cfg, "joint").to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, model)
        batches = epoch_batches(train, cfg, 1, device=device, resident=source)
        stats = train_epoch(model, optimizer, batches, cfg, "joint", device, max_steps=3)
        losses.append((stats["train_loss"], stats["steps"]))
    assert losses[0] == losses[1] and losses[0][1] == 3
