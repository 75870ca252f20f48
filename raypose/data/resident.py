"""The training split resident on the training device: the uint8 128 x 128 boxes, the poses and
the labels of every selected sample held there as tensors, with each batch gathered, its random
numbers drawn and its augmentation applied on the device. No host thread, no HDF5 read and no
copy per step; the one copy per epoch is the epoch's order of positions (int64, 8 bytes a sample).

The same batches as the host feed (raypose.data.dataset.iterate_batches) for the same seed: the
epoch's positions come from the same shard_positions, each batch holds the same positions in the
same order, and the random numbers of a sample are the same counter-based hash of (seed, epoch,
position) (dataset.augmentation_draws), computed here on the device in int64 arithmetic
(`device_draws`); augment_batch then does the same on both. tests/unit/test_resident.py holds
the two paths to equal tensors on the CPU device.

Memory: RESIDENT_SAMPLE_BYTES a sample (the box is 49,152 bytes), so 100,000 samples take about
4.9 GB. raypose.train.packing decides whether a worker keeps its split resident (data.feed).
"""

import numpy as np
import torch

from raypose.data.dataset import (
    DRAWS_PER_SAMPLE,
    IMAGE_SIZE,
    READ_WINDOW,
    PoseDataset,
    _splitmix64,
    augment_batch,
    batch_chunks,
    shard_positions,
)

JOINTS = 17
# the box, 3D and 2D joints (float32), the action index and the file row (int64)
RESIDENT_SAMPLE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3 + JOINTS * (3 + 2) * 4 + 2 * 8
# samples read from the file and copied to the device at a time while loading (about 200 MB)
LOAD_WINDOW = 8 * READ_WINDOW


def resident_bytes(samples: int) -> int:
    """The device memory that `samples` resident samples take."""
    return samples * RESIDENT_SAMPLE_BYTES


# ---------------------------------------------------------------------------------------------
# the counter-based hash of raypose.data.dataset, on int64 tensors


def _signed(constant: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return constant - 2**64 if constant >= 2**63 else constant


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """dataset._splitmix64 on int64 tensors: additions and products wrap modulo 2**64 in two's
    complement on the CPU and on CUDA alike, so the bits are those of the uint64 version."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def device_draws(seed: int, epoch: int, positions: torch.Tensor) -> torch.Tensor:
    """dataset.augmentation_draws(seed, epoch, positions) computed on positions' device:
    (B,) int64 -> (B, DRAWS_PER_SAMPLE) float32, bit for bit the same numbers."""
    # the key of (seed, epoch) is two scalars: made on the host, as augmentation_draws makes it
    key = _splitmix64(np.array([int(seed) % 2**64], dtype=np.uint64))
    key = int(_splitmix64(key ^ np.uint64(int(epoch) % 2**64))[0])
    keys = _splitmix64_tensor(positions.to(torch.int64) ^ _signed(key))  # (B,)
    draw = torch.arange(DRAWS_PER_SAMPLE, dtype=torch.int64, device=positions.device)
    bits = _splitmix64_tensor(keys[:, None] ^ draw)  # (B, D)
    # the top 24 bits, centred in their interval (float64 as numpy computes it, then float32)
    return ((_shift_right(bits, 40).to(torch.float64) + 0.5) / 2.0**24).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# the split on the device


class ResidentSplit:
    """A dataset's selected samples on `device`: images (N, 128, 128, 3) uint8, joints_3d
    (N, 17, 3) and joints_2d (N, 17, 2) float32 of the 128 box, action and row (N,) int64; index
    i is the dataset's position i. Loaded LOAD_WINDOW samples at a time, so the host holds one
    window, not the split."""

    def __init__(self, dataset: PoseDataset, device):
        self.dataset = dataset
        self.device = torch.device(device)
        n = len(dataset)
        self.images = torch.empty(
            (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=self.device
        )
        for start in range(0, n, LOAD_WINDOW):
            positions = np.arange(start, min(start + LOAD_WINDOW, n))
            images, where = dataset.read_images(positions)  # file order: where is 0..len-1
            window = torch.from_numpy(np.take(images, where, axis=0))
            self.images[start : start + len(positions)].copy_(window)
        poses = dataset._poses()
        self.joints_3d = torch.from_numpy(poses["joints_3d"]).to(self.device)
        self.joints_2d = torch.from_numpy(poses["joints_2d"]).to(self.device)
        self.action = torch.from_numpy(dataset.sample_actions).to(self.device)
        self.row = torch.from_numpy(dataset.indices).to(self.device)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        tensors = (self.images, self.joints_3d, self.joints_2d, self.action, self.row)
        return sum(t.numel() * t.element_size() for t in tensors)

    def raw_batch(self, positions: torch.Tensor, draws: torch.Tensor) -> dict:
        """What PoseDataset.host_batch holds for these positions, gathered on the device."""
        return {
            "images": self.images.index_select(0, positions),
            "joints_3d": self.joints_3d.index_select(0, positions),
            "joints_2d": self.joints_2d.index_select(0, positions),
            "draws": draws,
            "action": self.action.index_select(0, positions),
            "row": self.row.index_select(0, positions),
        }


def resident_batches(resident: ResidentSplit, chunks, epoch: int, channels_last: bool = False):
    """Training tensors for each chunk of positions (as dataset.device_batches yields them),
    from the resident split: the chunks' positions and their random numbers are put on the
    device once, then each batch is a gather and augment_batch there."""
    if not chunks:
        return
    dataset = resident.dataset
    positions = torch.from_numpy(np.concatenate(chunks).astype(np.int64)).to(resident.device)
    if dataset.augmentation.augment:
        draws = device_draws(dataset.seed, epoch, positions)  # (N, DRAWS_PER_SAMPLE)
    else:  # as host_batch: the centre crop's draws
        draws = torch.full(
            (len(positions), DRAWS_PER_SAMPLE), 0.5, dtype=torch.float32, device=resident.device
        )
    at = 0
    for chunk in chunks:
        part = slice(at, at + len(chunk))
        raw = resident.raw_batch(positions[part], draws[part])
        yield augment_batch(raw, dataset.augmentation, channels_last)
        at += len(chunk)


def iterate_resident(
    resident: ResidentSplit,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    channels_last: bool = False,
    epoch_samples: int = 0,
):
    """dataset.iterate_batches' batches (the same shard, chunks and tensors) from the resident
    split."""
    shard = shard_positions(
        len(resident), shuffle, seed, epoch, rank, world_size, drop_last, epoch_samples
    )
    yield from resident_batches(
        resident, batch_chunks(shard, batch_size, drop_last), epoch, channels_last
    )
