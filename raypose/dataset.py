"""Reading a split file (raypose.h5schema) into training batches, with augmentation and targets.

Each process opens its own h5py handle on first use (the handle is never pickled), so DataLoader
workers and Ray Train workers can share one PoseDataset object. `get_batch` is the fast path: it
reads the rows of a batch as a few contiguous runs and builds every tensor the losses need.

Per sample (`augment=True`; without augmentation: centre crop at offset 8, no noise, no flip):
  1. a random 112 x 112 crop of the 128 x 128 image, offsets (ox, oy) uniform in 0..16;
     2D joints move to (x - ox, y - oy);
  2. AlexNet PCA colour noise: alpha ~ N(0, color_noise) per principal colour axis, and
     rgb_eigvec @ (alpha * rgb_eigval) added to every pixel on the [0, 1] scale (file attributes);
  3. with probability 1/2 (flip=True) a left/right mirror: image columns reversed, 2D x -> 112 - x,
     3D x -> -x (camera coordinates), and left and right joints swapped (`flip_sample`).
Randomness comes from np.random.default_rng([seed, epoch, position]) per sample, so a sample's
augmentation depends only on (seed, epoch, its position), not on the batch it is read in.

Batch tensors (B samples):
  image      float32 (B, 3, 112, 112)  (x / 255 + colour noise - IMAGE_MEAN) / IMAGE_STD per channel
  offsets    float32 (B, 17, 3)        parent-relative offsets / OFFSET_SCALE_MM (regression targets)
  detection  float32 (B, 17, 100)      window indicators h_{i,l} for the crop taken (detection_targets)
  joints_3d  float32 (B, 17, 3)        root-relative joints, mm (after the flip, if any)
  joints_2d  float32 (B, 17, 2)        joints in pixels of the 112 crop (after crop and flip)
  action     int64   (B,)              index into dataset.action_names
  row        int64   (B,)              row numbers in the file
"""

import os
import queue
import threading

import h5py
import numpy as np
import torch

from raypose.h5schema import DataError, validate_file
from raypose.skeleton import H36M_SKELETON, OFFSET_SCALE_MM, Skeleton, parent_relative

CROP_SIZE = 112
IMAGE_SIZE = 128
MAX_OFFSET = IMAGE_SIZE - CROP_SIZE  # 16
CENTRE_OFFSET = MAX_OFFSET // 2  # 8
# Fixed input normalisation (the ImageNet statistics), the same for every file and split so that
# a model trained on one file reads another the same way.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def detection_targets(joints_2d: np.ndarray, grid: int = 10, window: int = 30, stride: int = 10,
                      crop_size: int = CROP_SIZE) -> np.ndarray:
    """Indicators h_{i,l}: 1 where joint i's 2D point lies inside sliding window l.

    joints_2d: (B, J, 2) crop pixels (x, y), pixel convention of raypose.h5schema.
    Window l = r * grid + c covers x in [stride * c, stride * c + window) and
    y in [stride * r, stride * r + window). A point outside the crop (x or y not in
    [0, crop_size)) lights no window, even where the last windows reach past the crop's edge.
    Returns (B, J, grid * grid) float32.
    """
    joints_2d = np.asarray(joints_2d, dtype=np.float64)
    assert joints_2d.ndim == 3 and joints_2d.shape[-1] == 2, joints_2d.shape
    starts = stride * np.arange(grid)  # (G,)
    x = joints_2d[..., 0:1]  # (B, J, 1)
    y = joints_2d[..., 1:2]
    inside = ((x >= 0) & (x < crop_size) & (y >= 0) & (y < crop_size))[..., 0]  # (B, J)
    in_col = (x >= starts) & (x < starts + window)  # (B, J, G)
    in_row = (y >= starts) & (y < starts + window)  # (B, J, G)
    hits = in_row[..., :, None] & in_col[..., None, :] & inside[..., None, None]  # (B, J, G, G)
    return hits.reshape(*joints_2d.shape[:2], grid * grid).astype(np.float32)


def flip_sample(image, joints_2d: np.ndarray, joints_3d: np.ndarray,
                skeleton: Skeleton = H36M_SKELETON):
    """Left/right mirror of one sample or a batch.

    image: (..., H, W, C) or None; joints_2d: (..., J, 2) pixels of that image (x -> W - x, the
    pixel convention of raypose.h5schema); joints_3d: (..., J, 3) camera coordinates (x -> -x).
    Left and right joints swap places (skeleton.flip_permutation()), so flipped 'LWrist' is the
    mirror image of the old 'RWrist'. Returns (image, joints_2d, joints_3d); flipping twice is the
    identity. W defaults to the crop width when image is None.
    """
    perm = skeleton.flip_permutation()
    width = CROP_SIZE if image is None else image.shape[-2]
    j2 = np.array(joints_2d, dtype=np.float32)[..., perm, :]
    j2[..., 0] = width - j2[..., 0]
    j3 = np.array(joints_3d, dtype=np.float32)[..., perm, :]
    j3[..., 0] = -j3[..., 0]
    flipped = None if image is None else image[..., ::-1, :]
    return flipped, j2, j3


def _contiguous_runs(sorted_rows: np.ndarray):
    """(start, stop, offset) for each run of consecutive row numbers in a sorted array."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(sorted_rows)]))
    return [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class PoseDataset(torch.utils.data.Dataset):
    """The samples of one split file, filtered by subject and action.

    subjects / exclude_subjects / actions: lists of names (None = no filter); the validation split
    is the training file with exclude_subjects=[...] for training and subjects=[...] for validation.
    max_samples > 0 keeps that many rows, evenly spaced over the selection (for smoke runs).

    Attributes: indices (sorted int64 file rows of the selection; a "position" indexes this array),
    action_names (sorted action strings of the whole file, so train and validation subsets of one
    file agree), sample_actions (int64 index into action_names per position), joint_names,
    subjects (those in the selection), info (validate_file's summary).
    """

    def __init__(self, path, subjects=None, exclude_subjects=None, actions=None, augment=False,
                 color_noise=0.1, flip=True, max_samples=0, seed=0, skeleton: Skeleton = H36M_SKELETON):
        self.path = str(path)
        self.info = validate_file(self.path)
        self.augment = bool(augment)
        self.color_noise = float(color_noise)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.skeleton = skeleton
        self.joint_names = list(self.info["joint_names"])
        self.action_names = list(self.info["actions"])
        self._file = None
        self._pid = None
        self._pose_cache = None
        with h5py.File(self.path, "r") as f:
            subject_of_row = f["subject"].asstr()[:]
            action_of_row = f["action"].asstr()[:]
            self.rgb_eigval = np.asarray(f.attrs["rgb_eigval"], dtype=np.float32)
            self.rgb_eigvec = np.asarray(f.attrs["rgb_eigvec"], dtype=np.float32)
        keep = np.ones(len(subject_of_row), dtype=bool)
        filters = []
        if subjects is not None:
            keep &= np.isin(subject_of_row, list(subjects))
            filters.append(f"subjects={list(subjects)}")
        if exclude_subjects is not None:
            keep &= ~np.isin(subject_of_row, list(exclude_subjects))
            filters.append(f"exclude_subjects={list(exclude_subjects)}")
        if actions is not None:
            keep &= np.isin(action_of_row, list(actions))
            filters.append(f"actions={list(actions)}")
        indices = np.flatnonzero(keep).astype(np.int64)
        if len(indices) == 0:
            raise DataError(
                f"no samples in {self.path} for {', '.join(filters)} (keys 'subject'/'action'); "
                f"the file has subjects {self.info['subjects']} and actions {self.info['actions']}")
        if max_samples and max_samples < len(indices):
            pick = np.unique(np.linspace(0, len(indices) - 1, int(max_samples)).round().astype(np.int64))
            indices = indices[pick]
        self.indices = indices
        names, action_ids = np.unique(action_of_row, return_inverse=True)
        assert names.tolist() == self.action_names
        self.sample_actions = action_ids[indices].astype(np.int64)  # per selected sample
        self.subjects = sorted(set(subject_of_row[indices].tolist()))

    # process-local file handle -------------------------------------------------------------------
    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        state["_pose_cache"] = None  # re-read in the new process, keeps pickles small
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        batch = self.get_batch([i % len(self)])
        return {key: value[0] for key, value in batch.items()}

    # reading ---------------------------------------------------------------------------------
    def read_rows(self, rows, keys=("images", "joints_3d", "joints_2d")) -> dict:
        """Raw arrays for file rows (any order): sorted, read run by run, then put back in order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        runs = _contiguous_runs(rows[order])
        f = self._h5()
        out = {}
        for key in keys:
            ds = f[key]
            tail = ds.shape[1:]
            buf = np.empty((len(rows), *tail), dtype=ds.dtype)
            file_space = ds.id.get_space()
            zeros = (0,) * len(tail)
            for start, stop, at in runs:  # low-level reads: h5py's read_direct costs ~4x more per call
                count = (stop - start, *tail)
                file_space.select_hyperslab((start, *zeros), count)
                ds.id.read(h5py.h5s.create_simple(count), file_space, buf[at:at + stop - start])
            result = np.empty_like(buf)
            result[order] = buf
            out[key] = result
        return out

    def _poses(self) -> dict:
        """joints_3d and joints_2d of all selected rows, read once per process (~200 bytes/sample)."""
        if self._pose_cache is None:
            self._pose_cache = self.read_rows(self.indices, keys=("joints_3d", "joints_2d"))
        return self._pose_cache

    def _augmentation(self, positions: np.ndarray, epoch: int):
        """Per-sample crop offsets (B, 2) as (ox, oy), colour alphas (B, 3) and flip flags (B,)."""
        b = len(positions)
        if not self.augment:
            return (np.full((b, 2), CENTRE_OFFSET, dtype=np.int64), np.zeros((b, 3), np.float32),
                    np.zeros(b, dtype=bool))
        offsets = np.empty((b, 2), dtype=np.int64)
        alphas = np.empty((b, 3), dtype=np.float32)
        flips = np.empty(b, dtype=bool)
        for k, position in enumerate(positions):
            rng = np.random.default_rng([self.seed, int(epoch), int(position)])
            offsets[k] = rng.integers(0, MAX_OFFSET + 1, size=2)
            alphas[k] = rng.normal(0.0, 1.0, size=3) * self.color_noise
            flips[k] = rng.random() < 0.5
        if not self.flip:
            flips[:] = False
        return offsets, alphas, flips

    def get_batch(self, positions, epoch: int = 0) -> dict:
        """Batched tensors for positions (indices into self.indices); see the module docstring."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)}), "
                             f"got {positions.min()}..{positions.max()}")
        rows = self.indices[positions]
        images = self.read_rows(rows, keys=("images",))["images"]  # (B, 128, 128, 3) uint8
        poses = self._poses()
        crop_xy, alphas, flips = self._augmentation(positions, epoch)
        b = len(positions)

        # crop: (B, 112, 112, 3) uint8
        crops = np.empty((b, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        for k in range(b):
            ox, oy = crop_xy[k]
            crops[k] = images[k, oy:oy + CROP_SIZE, ox:ox + CROP_SIZE]
        joints_2d = poses["joints_2d"][positions] - crop_xy[:, None, :].astype(np.float32)  # (B, 17, 2)
        joints_3d = poses["joints_3d"][positions].astype(np.float32)  # (B, 17, 3)
        if flips.any():
            crops[flips], joints_2d[flips], joints_3d[flips] = flip_sample(
                crops[flips], joints_2d[flips], joints_3d[flips], self.skeleton)

        # (x / 255 + noise - mean) / std as one multiply-add per pixel, in numpy: single-threaded,
        # so it does not compete with the training step's torch threads
        noise = (self.rgb_eigvec @ (alphas * self.rgb_eigval).T).T  # (B, 3), [0, 1] scale
        shift = ((noise - IMAGE_MEAN) / IMAGE_STD).astype(np.float32)  # (B, 3)
        scale = (1.0 / (255.0 * IMAGE_STD)).astype(np.float32)  # (3,)
        image = np.empty((b, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)  # (B, 3, 112, 112)
        np.multiply(crops.transpose(0, 3, 1, 2), scale[None, :, None, None], out=image)
        image += shift[:, :, None, None]

        offsets = parent_relative(joints_3d, self.skeleton) / OFFSET_SCALE_MM
        return {
            "image": torch.from_numpy(image),
            "offsets": torch.from_numpy(offsets.astype(np.float32)),
            "detection": torch.from_numpy(detection_targets(joints_2d)),
            "joints_3d": torch.from_numpy((joints_3d - joints_3d[:, :1]).astype(np.float32)),
            "joints_2d": torch.from_numpy(joints_2d.astype(np.float32)),
            "action": torch.from_numpy(self.sample_actions[positions]),
            "row": torch.from_numpy(rows),
        }

    def root_relative_poses(self) -> np.ndarray:
        """(N, 17, 3) float64 root-relative joints of the selected rows, mm; reads no image."""
        joints = self._poses()["joints_3d"].astype(np.float64)
        return joints - joints[:, :1]



def shard_positions(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1, drop_last: bool = False) -> np.ndarray:
    """This rank's positions for one epoch, like torch's DistributedSampler.

    A permutation of range(n) seeded by (seed, epoch) (identity when shuffle=False) is made
    divisible by world_size: drop_last=False pads it by wrapping around to its start,
    drop_last=True drops the remainder. Rank r takes every world_size-th entry from r, so all
    ranks get disjoint (up to the padding) shards of equal length, which DDP needs.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle
             else np.arange(n))
    if drop_last:
        order = order[:n - n % world_size]
    else:
        total = -(-n // world_size) * world_size
        order = np.resize(order, total)  # wraps around
    return order[rank::world_size]


def iterate_batches(dataset: PoseDataset, batch_size: int, shuffle: bool, seed: int, epoch: int,
                    rank: int = 0, world_size: int = 1, drop_last: bool = False, prefetch: int = 0):
    """Yields dataset.get_batch(...) dicts for this rank's shard of one epoch.

    Shards follow shard_positions (padding by wrapping unless drop_last, so every rank takes the
    same number of steps). drop_last also drops this shard's last incomplete batch.
    prefetch > 0 reads up to that many batches ahead in a background thread.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = shard_positions(len(dataset), shuffle, seed, epoch, rank, world_size, drop_last)
    stops = range(batch_size, len(shard) + (0 if drop_last else batch_size), batch_size)
    chunks = [shard[stop - batch_size:min(stop, len(shard))] for stop in stops]
    chunks = [c for c in chunks if len(c)]
    if prefetch <= 0:
        for chunk in chunks:
            yield dataset.get_batch(chunk, epoch=epoch)
        return
    yield from _prefetched(dataset, chunks, epoch, prefetch)


def _prefetched(dataset, chunks, epoch, depth):
    """Reads batches in a daemon thread, depth batches ahead; re-raises its errors here."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def reader():
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                q.put(dataset.get_batch(chunk, epoch=epoch))
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=reader, daemon=True, name="raypose-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
