"""Reading a split file (raypose.data.schema) into training batches: uint8 crops on the host,
augmentation and targets on the device.

Two halves, so that a GPU never waits for Python loops on the host:

Host (`PoseDataset.host_batch`, `host_batches`): reads the uint8 128 x 128 images of a batch (a
window of several batches at a time, as a few contiguous HDF5 reads), gathers the poses from a
per-process cache, and draws the batch's random numbers. On CUDA the arrays land in pinned memory,
so that the copy to the device is asynchronous. `iterate_batches` runs this in a background thread,
`prefetch` batches ahead of the training step.

Device (`augment_batch`, torch, on whatever device the batch is on), per sample:
  1. a 112 x 112 crop of the 128 x 128 image at offset (ox, oy) in 0..16 (`crop_offsets`): drawn
     uniformly among the offsets that keep every 2D joint inside the crop; when no offset does (the
     joints span more than 112 px, or lie outside the box), the offset closest to keeping them.
     2D joints move to (x - ox, y - oy);
  2. AlexNet PCA colour noise: alpha ~ N(0, color_noise) per principal colour axis, and
     rgb_eigvec @ (alpha * rgb_eigval) added to every pixel on the [0, 1] scale (file attributes);
  3. with probability 1/2 (flip=True) a left/right mirror: image columns reversed, 2D x -> 112 - x,
     3D x -> -x (camera coordinates), and left and right joints swapped
     (Skeleton.flip_permutation).
Without augmentation (validation, test): the centre crop at offset 8, no noise, no flip.

Preparing a test sample (the one place that defines it; `raypose evaluate` and `raypose predict`
both run this code):
  1. the 128 x 128 box: a split file holds it already (raypose.data.h36m crops a square around
     the person, pads it with black and resizes it with Pillow's bilinear filter); an image file
     becomes one with `box_image`, which takes the square centred on the image with its longer
     side and resizes it with the converter's own crop_image;
  2. the centre 112 x 112 crop (offset 8 on both axes), no flip;
  3. (x / 255 - IMAGE_MEAN) / IMAGE_STD per RGB channel, no colour noise, as float32
     (B, 3, 112, 112) (`prepare_test_images`; augment_batch calls it for every sample read
     without augmentation).

The random numbers of a sample are a counter-based hash of (seed, epoch, position)
(`augmentation_draws`), so a sample's augmentation depends only on those three, never on the
batch, the rank or the thread it is read in.

Batch tensors (B samples), all on the device:
  image      float32 (B, 3, 112, 112)  (x / 255 + colour noise - IMAGE_MEAN) / IMAGE_STD per channel;
                                       channels_last memory format when asked for
  offsets    float32 (B, 17, 3)        parent-relative offsets / OFFSET_SCALE_MM (regression targets)
  detection  float32 (B, 17, 100)      window indicators h_{i,l} for the crop taken (detection_targets)
  joints_3d  float32 (B, 17, 3)        root-relative joints, mm (after the flip, if any)
  joints_2d  float32 (B, 17, 2)        joints in pixels of the 112 crop (after crop and flip)
  action     int64   (B,)              index into dataset.action_names
  row        int64   (B,)              row numbers in the file

Shuffling keeps reads contiguous (`epoch_order`): the selection is cut into blocks of
SHUFFLE_BLOCK consecutive samples, the blocks are put in a random order, and the samples of each
run of SHUFFLE_BUFFER blocks are shuffled among themselves. A batch therefore mixes samples of
SHUFFLE_BUFFER random places in the file, and a window of batches is read as about that many
contiguous runs.
"""

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import ImageOps

from raypose.data.h36m import crop_image
from raypose.data.schema import DataError, check_same_skeleton, read_skeleton, validate_file
from raypose.data.skeleton import H36M_SKELETON, OFFSET_SCALE_MM, Skeleton

CROP_SIZE = 112
IMAGE_SIZE = 128
MAX_OFFSET = IMAGE_SIZE - CROP_SIZE  # 16
CENTRE_OFFSET = MAX_OFFSET // 2  # 8
# Fixed input normalisation (the ImageNet statistics), the same for every file and split so that
# a model trained on one file reads another the same way.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

SHUFFLE_BLOCK = 64  # consecutive samples that stay together when shuffling (one HDF5 chunk)
SHUFFLE_BUFFER = 8  # blocks whose samples are shuffled among themselves
READ_WINDOW = SHUFFLE_BLOCK * SHUFFLE_BUFFER  # samples whose images are read together
# uniform draws per sample: crop x, crop y, flip, and four for three Box-Muller normals
DRAWS_PER_SAMPLE = 7


# ---------------------------------------------------------------------------------------------
# random numbers: a counter-based hash of (seed, epoch, position, draw)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def augmentation_draws(seed: int, epoch: int, positions) -> np.ndarray:
    """Uniform numbers in (0, 1) for each position: (B, DRAWS_PER_SAMPLE) float32.

    A pure function of (seed, epoch, position): no generator state, so any subset of positions
    in any order gets the same numbers per position."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1).astype(np.uint64)
    key = _splitmix64(np.array([int(seed) % 2**64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(int(epoch) % 2**64))
    key = _splitmix64(key ^ positions)  # (B,)
    bits = _splitmix64(key[:, None] ^ np.arange(DRAWS_PER_SAMPLE, dtype=np.uint64))  # (B, D)
    # the top 24 bits, centred in their interval: never exactly 0 or 1
    return (((bits >> np.uint64(40)).astype(np.float64) + 0.5) / 2.0**24).astype(np.float32)


def standard_normals(uniforms):
    """Box-Muller: (B, 4) uniforms in (0, 1) -> (B, 3) standard normal numbers (torch)."""
    radius_a = torch.sqrt(-2.0 * torch.log(uniforms[:, 0]))
    radius_b = torch.sqrt(-2.0 * torch.log(uniforms[:, 2]))
    angle_a = 2.0 * torch.pi * uniforms[:, 1]
    angle_b = 2.0 * torch.pi * uniforms[:, 3]
    return torch.stack(
        [
            radius_a * torch.cos(angle_a),
            radius_a * torch.sin(angle_a),
            radius_b * torch.cos(angle_b),
        ],
        dim=1,
    )


# ---------------------------------------------------------------------------------------------
# device side (torch): crop, flip, colour noise, normalisation, targets


def detection_targets(
    joints_2d, grid: int = 10, window: int = 30, stride: int = 10, crop_size: int = CROP_SIZE
) -> torch.Tensor:
    """Indicators h_{i,l}: 1 where joint i's 2D point lies inside sliding window l.

    joints_2d: (B, J, 2) crop pixels (x, y), pixel convention of raypose.data.schema (a tensor on
    any device, or an array). Window l = r * grid + c covers x in [stride * c, stride * c + window)
    and y in [stride * r, stride * r + window). A point outside the crop (x or y not in
    [0, crop_size)) lights no window, even where the last windows reach past the crop's edge.
    Returns (B, J, grid * grid) float32 on joints_2d's device.
    """
    joints_2d = torch.as_tensor(joints_2d)
    assert joints_2d.ndim == 3 and joints_2d.shape[-1] == 2, joints_2d.shape
    starts = stride * torch.arange(grid, device=joints_2d.device, dtype=joints_2d.dtype)  # (G,)
    x = joints_2d[..., 0:1]  # (B, J, 1)
    y = joints_2d[..., 1:2]
    inside = ((x >= 0) & (x < crop_size) & (y >= 0) & (y < crop_size))[..., 0]  # (B, J)
    in_col = (x >= starts) & (x < starts + window)  # (B, J, G)
    in_row = (y >= starts) & (y < starts + window)  # (B, J, G)
    hits = in_row[..., :, None] & in_col[..., None, :] & inside[..., None, None]  # (B, J, G, G)
    return hits.reshape(*joints_2d.shape[:2], grid * grid).to(torch.float32)


def crop_offsets(joints_2d: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Crop offsets (B, 2) int64, as (ox, oy), that keep every joint inside the 112 crop.

    joints_2d: (B, J, 2) pixels of the 128 box; uniforms: (B, 2) in (0, 1). Per axis, the offsets
    o in 0..16 with o <= min(x) and max(x) < o + 112 are [lo, hi] with lo = floor(max(x)) - 111
    and hi = floor(min(x)), both clamped to 0..16; the offset is uniform over them. Where lo > hi
    (the joints span more than 112 px), it is the middle of the two, which cuts the least off
    either side. Joints outside the box clamp to the nearest edge offset.
    """
    lo = (torch.floor(joints_2d.amax(dim=1)) - (CROP_SIZE - 1)).clamp(0, MAX_OFFSET)  # (B, 2)
    hi = torch.floor(joints_2d.amin(dim=1)).clamp(0, MAX_OFFSET)  # (B, 2)
    span = hi - lo + 1
    uniform = lo + torch.minimum(torch.floor(uniforms * span), span - 1)
    middle = torch.floor((lo + hi) / 2)
    return torch.where(lo <= hi, uniform, middle).to(torch.int64)


@dataclass
class Augmentation:
    """What augment_batch needs from a dataset: its settings and the file's colour statistics."""

    augment: bool
    color_noise: float
    flip: bool
    rgb_eigval: np.ndarray  # (3,)
    rgb_eigvec: np.ndarray  # (3, 3), columns
    skeleton: Skeleton = H36M_SKELETON

    def constants(self, device: torch.device) -> dict:
        """Constant tensors on device, made once per device: a copy from ordinary host memory
        inside the step loop would wait for the device."""
        cache = self.__dict__.setdefault("_constants", {})
        if device not in cache:
            parents = np.array(self.skeleton.parents)
            values = {
                "eigval": self.rgb_eigval,
                "eigvec": self.rgb_eigvec,
                "mean": IMAGE_MEAN,
                "std": IMAGE_STD,
                "flip_permutation": self.skeleton.flip_permutation(),
                "parent": np.where(parents < 0, np.arange(len(parents)), parents),  # root: itself
                "steps": np.arange(CROP_SIZE),
                # a mirror: x -> 112 - x in crop pixels, x -> -x in camera coordinates
                "mirror_2d_scale": np.float32([-1, 1]),
                "mirror_2d_shift": np.float32([CROP_SIZE, 0]),
                "mirror_3d_scale": np.float32([-1, 1, 1]),
            }
            cache[device] = {k: torch.as_tensor(v).to(device) for k, v in values.items()}
        return cache[device]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_constants", None)
        return state


def image_constants(device: torch.device) -> dict:
    """The tensors crop_and_normalise reads (normalisation and crop steps), on device; a dataset's
    Augmentation.constants holds the same ones, made once per device."""
    values = {"mean": IMAGE_MEAN, "std": IMAGE_STD, "steps": np.arange(CROP_SIZE)}
    return {k: torch.as_tensor(v).to(device) for k, v in values.items()}


def crop_and_normalise(
    images, offsets, flips, noise, const: dict, channels_last: bool = False
) -> torch.Tensor:
    """The network's input: (B, 128, 128, 3) uint8 boxes -> (B, 3, 112, 112) float32.

    Per sample the 112 crop at offsets (B, 2) int64 (ox, oy), its columns reversed where flips
    (B,) bool, and (x / 255 + noise - IMAGE_MEAN) / IMAGE_STD per channel with noise (B, 3) on the
    [0, 1] scale. const: image_constants (or Augmentation.constants) on the images' device."""
    device, b = images.device, images.shape[0]
    # crop and mirror in one gather of uint8 pixels: (B, 112, 112, 3)
    steps = const["steps"]  # 0..111
    rows = offsets[:, 1:2] + steps  # (B, 112)
    cols = offsets[:, 0:1] + torch.where(flips[:, None], CROP_SIZE - 1 - steps, steps)  # (B, 112)
    # index of each crop pixel among the batch's B * 128 * 128 RGB pixels: one index_select of
    # 3-byte rows is ~3x faster than indexing with three index tensors
    batch_index = torch.arange(b, device=device)[:, None, None]
    pixel = (batch_index * IMAGE_SIZE + rows[:, :, None]) * IMAGE_SIZE + cols[
        :, None, :
    ]  # (B, 112, 112)
    crops = (
        images.reshape(-1, 3).index_select(0, pixel.reshape(-1)).view(b, CROP_SIZE, CROP_SIZE, 3)
    )

    # (x / 255 + noise - mean) / std as one fused multiply-add per pixel
    shift = (noise - const["mean"]) / const["std"]  # (B, 3)
    scale = 1.0 / (255.0 * const["std"])  # (3,)
    image = torch.addcmul(
        shift[:, None, None, :], crops.to(torch.float32), scale
    )  # (B, 112, 112, 3)
    image = image.permute(0, 3, 1, 2)  # (B, 3, 112, 112), channels_last strides
    if not channels_last:
        image = image.contiguous()
    return image


def prepare_test_images(images, channels_last: bool = False, const: dict | None = None):
    """A test sample's input to the network (module docstring, "Preparing a test sample"): the
    centre 112 crop of each uint8 128 x 128 box, no colour noise, no flip, normalised.
    images: (B, 128, 128, 3) uint8 tensor -> (B, 3, 112, 112) float32 on its device."""
    assert images.ndim == 4 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
    device, b = images.device, images.shape[0]
    const = image_constants(device) if const is None else const
    offsets = torch.full((b, 2), CENTRE_OFFSET, dtype=torch.int64, device=device)
    flips = torch.zeros(b, dtype=torch.bool, device=device)
    noise = torch.zeros((b, 3), dtype=torch.float32, device=device)
    return crop_and_normalise(images, offsets, flips, noise, const, channels_last)


def centre_crop(boxes: np.ndarray) -> np.ndarray:
    """The uint8 pixels a test sample's input holds, before normalisation (for figures):
    (N, 128, 128, 3) -> (N, 112, 112, 3)"""
    end = CENTRE_OFFSET + CROP_SIZE
    return boxes[:, CENTRE_OFFSET:end, CENTRE_OFFSET:end]


def box_image(image) -> np.ndarray:
    """A person crop of any size (a PIL image) as the uint8 128 x 128 RGB box a split file holds:
    turned upright by its EXIF orientation (a camera's photo), the square centred on it with its
    longer side, black where it leaves the image, resized by raypose.data.h36m.crop_image, the
    converter's own resize. (128, 128, 3) uint8"""
    image = ImageOps.exif_transpose(image)
    width, height = image.size
    side = max(width, height)
    return crop_image(image, ((width - side) // 2, (height - side) // 2, side), IMAGE_SIZE)


def augment_batch(raw: dict, aug: Augmentation, channels_last: bool = False) -> dict:
    """Training tensors (module docstring) from a host batch, on the host batch's device.

    raw: images uint8 (B, 128, 128, 3), joints_3d (B, 17, 3) and joints_2d (B, 17, 2) float32 of
    the 128 box, draws (B, DRAWS_PER_SAMPLE) float32 (augmentation_draws), action, row int64."""
    images = raw["images"]
    assert images.ndim == 4 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
    device, b = images.device, images.shape[0]
    joints_2d, joints_3d, draws = raw["joints_2d"], raw["joints_3d"], raw["draws"]
    const = aug.constants(device)
    if aug.augment:
        offsets = crop_offsets(joints_2d, draws[:, 0:2])  # (B, 2)
        flips = draws[:, 2] < 0.5 if aug.flip else torch.zeros(b, dtype=torch.bool, device=device)
        alphas = standard_normals(draws[:, 3:7]) * aug.color_noise  # (B, 3)
        noise = (alphas * const["eigval"]) @ const["eigvec"].T  # (B, 3): eigvec @ (alpha * eigval)
        image = crop_and_normalise(images, offsets, flips, noise, const, channels_last)
    else:  # validation and test: the preparation that `raypose predict` shares
        offsets = torch.full((b, 2), CENTRE_OFFSET, dtype=torch.int64, device=device)
        flips = torch.zeros(b, dtype=torch.bool, device=device)
        image = prepare_test_images(images, channels_last, const)

    # joints follow the crop and the mirror; mirrored left joints become right joints and back
    joints_2d = joints_2d - offsets[:, None, :].to(joints_2d.dtype)  # (B, 17, 2) crop pixels
    perm = const["flip_permutation"]
    flipped_2d = joints_2d[:, perm] * const["mirror_2d_scale"] + const["mirror_2d_shift"]
    flipped_3d = joints_3d[:, perm] * const["mirror_3d_scale"]
    joints_2d = torch.where(flips[:, None, None], flipped_2d, joints_2d)
    joints_3d = torch.where(flips[:, None, None], flipped_3d, joints_3d)
    # parent_relative (raypose.data.skeleton) with the parent index already on device
    offsets_3d = joints_3d - joints_3d[:, const["parent"]]  # (B, 17, 3)
    return {
        "image": image,
        "offsets": offsets_3d / OFFSET_SCALE_MM,
        "detection": detection_targets(joints_2d),
        "joints_3d": joints_3d - joints_3d[:, :1],
        "joints_2d": joints_2d,
        "action": raw["action"],
        "row": raw["row"],
    }


# ---------------------------------------------------------------------------------------------
# host side: the file, the selection, reads


def _contiguous_runs(sorted_rows: np.ndarray):
    """(start, stop, offset) for each run of consecutive row numbers in a sorted array."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(sorted_rows)]))
    return [
        (int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)
    ]


def validation_rows(subject_of_row, action_of_row, val_subjects=(), every: int = 0) -> np.ndarray:
    """Which rows of train.h5 validation holds out: every row of val_subjects, and with every > 0
    every `every`-th sequence (one subject's one action, in sorted order) of the other subjects.
    The choice depends on the file alone, so the training and validation sides always agree.
    [N] bool"""
    subject_of_row = np.asarray(subject_of_row)
    action_of_row = np.asarray(action_of_row)
    held = np.isin(subject_of_row, list(val_subjects))
    if every > 0:
        sequence_of_row = np.char.add(np.char.add(subject_of_row.astype(str), "/"), action_of_row)
        sequences = np.unique(sequence_of_row[~held])
        picked = sequences[every - 1 :: every]  # the Nth, 2Nth, ...: none when fewer than N
        held |= np.isin(sequence_of_row, picked)
    return held


def has_validation(val_subjects, val_sequence_every: int) -> bool:
    """Whether a run validates at all: with neither it trains on every subject and sequence."""
    return bool(val_subjects) or val_sequence_every > 0


class PoseDataset:
    """The samples of one split file, filtered by subject and action.

    subjects / exclude_subjects / actions: lists of names (None = no filter). split: "train" or
    "validation" keeps that side of train.h5 (validation_rows: val_subjects and every
    val_sequence_every-th sequence of the others are held out); None keeps both.
    max_samples > 0 keeps that many rows, evenly spaced over the selection (for smoke runs).
    info: validate_file's summary of this file when the caller has validated it already (the
    driver does, once, for every worker); None validates here.

    Skeletons must agree, or DataError names both files: a test.h5 with the train.h5 beside it
    (a model trained on one reads the other), and the file with the info it is opened with (the
    validation selection with train.h5's summary).

    Each process opens its own h5py handle on first use (the handle is never pickled).

    Attributes: indices (sorted int64 file rows of the selection; a "position" indexes this array),
    action_names (sorted action strings of the whole file, so train and validation subsets of one
    file agree), sample_actions (int64 index into action_names per position), joint_names,
    subjects (sorted names of those in the selection), sample_subjects (int64 index into subjects
    per position), info (validate_file's summary), augmentation.
    """

    def __init__(
        self,
        path,
        subjects=None,
        exclude_subjects=None,
        actions=None,
        augment=False,
        color_noise=0.1,
        flip=True,
        max_samples=0,
        seed=0,
        skeleton: Skeleton = H36M_SKELETON,
        info: dict | None = None,
        split: str | None = None,
        val_subjects=(),
        val_sequence_every: int = 0,
    ):
        self.path = str(path)
        self.info = validate_file(self.path) if info is None else info
        self.seed = int(seed)
        self.joint_names = list(self.info["joint_names"])
        self.action_names = list(self.info["actions"])
        self._file = None
        self._pid = None
        self._pose_cache = None
        with h5py.File(self.path, "r") as f:
            if f["images"].shape[0] != self.info["n"]:
                raise DataError(
                    f"{self.path}: key 'images': {f['images'].shape[0]} rows, but the file "
                    f"had {self.info['n']} when it was validated; it changed since"
                )
            subject_of_row = f["subject"].asstr()[:]
            action_of_row = f["action"].asstr()[:]
            # validated here: the summary's own; else the file may not be the one summarised
            self._check_skeleton(None if info is None else read_skeleton(f))
        # a file whose samples do not mirror into samples of the same data (a fixed side-colour
        # code, h5schema's mirror_consistent) is never flipped: the mirror would teach a look that
        # never occurs at test
        self.flip = bool(flip) and bool(self.info.get("mirror_consistent", True))
        self.augmentation = Augmentation(
            bool(augment),
            float(color_noise),
            self.flip,
            np.asarray(self.info["rgb_eigval"], dtype=np.float32),
            np.asarray(self.info["rgb_eigvec"], dtype=np.float32),
            skeleton,
        )
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
        if split is not None:
            held = validation_rows(subject_of_row, action_of_row, val_subjects, val_sequence_every)
            keep &= held if split == "validation" else ~held
            filters.append(
                f"the {split} split (val_subjects={list(val_subjects)}, "
                f"val_sequence_every={val_sequence_every})"
            )
        indices = np.flatnonzero(keep).astype(np.int64)
        if len(indices) == 0:
            raise DataError(
                f"no samples in {self.path} for {', '.join(filters)} (keys 'subject'/'action'); "
                f"the file has subjects {self.info['subjects']} and actions {self.info['actions']}"
            )
        if max_samples and max_samples < len(indices):
            pick = np.unique(
                np.linspace(0, len(indices) - 1, int(max_samples)).round().astype(np.int64)
            )
            indices = indices[pick]
        self.indices = indices
        names, action_ids = np.unique(action_of_row, return_inverse=True)
        assert names.tolist() == self.action_names
        self.sample_actions = action_ids[indices].astype(np.int64)  # per selected sample
        self.subjects = sorted(set(subject_of_row[indices].tolist()))
        self.sample_subjects = np.searchsorted(self.subjects, subject_of_row[indices]).astype(
            np.int64
        )

    def _check_skeleton(self, ours: dict | None) -> None:
        """ours: this file's skeleton when self.info summarises a file that may be another."""
        skeleton = self.info.get("skeleton")
        if skeleton is None:
            return  # a summary from before validate_file reported skeletons
        if ours is not None:
            check_same_skeleton(
                self.path, ours, self.info.get("path", "the validated file"), skeleton
            )
        here = Path(self.path)
        if here.name == "test.h5" and (here.parent / "train.h5").is_file():
            train = read_skeleton(here.parent / "train.h5")
            if train is not None:  # else train.h5's own validation names what is wrong
                check_same_skeleton(self.path, skeleton, here.parent / "train.h5", train)

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
    def _read_sorted(self, key: str, sorted_rows: np.ndarray, out: np.ndarray) -> None:
        """Rows (sorted, unique) of one dataset into out, one low-level read per contiguous run
        (h5py's read_direct costs ~4x more per call)."""
        ds = self._h5()[key]
        tail = ds.shape[1:]
        file_space = ds.id.get_space()
        zeros = (0,) * len(tail)
        for start, stop, at in _contiguous_runs(sorted_rows):
            count = (stop - start, *tail)
            file_space.select_hyperslab((start, *zeros), count)
            ds.id.read(h5py.h5s.create_simple(count), file_space, out[at : at + stop - start])

    def read_rows(self, rows, keys=("images", "joints_3d", "joints_2d")) -> dict:
        """Raw arrays for file rows (any order): sorted, read run by run, then put back in order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        f = self._h5()
        out = {}
        for key in keys:
            buf = np.empty((len(rows), *f[key].shape[1:]), dtype=f[key].dtype)
            self._read_sorted(key, rows[order], buf)
            result = np.empty_like(buf)
            result[order] = buf
            out[key] = result
        return out

    def _poses(self) -> dict:
        """joints_3d and joints_2d of all selected rows, read once per process (~200 bytes/sample)."""
        if self._pose_cache is None:
            self._pose_cache = self.read_rows(self.indices, keys=("joints_3d", "joints_2d"))
        return self._pose_cache

    def read_images(self, positions) -> tuple:
        """(images, where): the uint8 images (U, 128, 128, 3) of the distinct rows of positions,
        in file order, read as contiguous runs, and for each position its index into them."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        self._check_positions(positions)
        rows, where = np.unique(self.indices[positions], return_inverse=True)
        images = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        self._read_sorted("images", rows, images)
        return images, where.reshape(-1)

    def _check_positions(self, positions: np.ndarray) -> None:
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(
                f"positions must lie in [0, {len(self)}), got {positions.min()}..{positions.max()}"
            )

    def host_batch(
        self, positions, epoch: int = 0, pin_memory: bool = False, images=None, where=None
    ) -> dict:
        """The host half of a batch: uint8 images, poses of the 128 box and random draws, as CPU
        tensors (pinned when pin_memory, for an asynchronous copy to a GPU).

        images, where: read_images' result for a window that holds these positions (read here
        when None). Keys: images (B, 128, 128, 3) uint8, joints_3d (B, 17, 3), joints_2d (B, 17, 2),
        draws (B, DRAWS_PER_SAMPLE) float32, action, row (B,) int64."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if images is None:
            images, where = self.read_images(positions)
        self._check_positions(positions)
        poses = self._poses()
        b = len(positions)
        out = torch.empty((b, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, pin_memory=pin_memory)
        np.take(images, where, axis=0, out=out.numpy())
        draws = (
            augmentation_draws(self.seed, epoch, positions)
            if self.augmentation.augment
            else np.full((b, DRAWS_PER_SAMPLE), 0.5, dtype=np.float32)
        )
        small = {
            "joints_3d": poses["joints_3d"][positions],
            "joints_2d": poses["joints_2d"][positions],
            "draws": draws,
            "action": self.sample_actions[positions],
            "row": self.indices[positions],
        }
        batch = {"images": out}
        for key, value in small.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value))
            batch[key] = tensor.pin_memory() if pin_memory else tensor
        return batch

    def get_batch(
        self, positions, epoch: int = 0, device=None, channels_last: bool = False
    ) -> dict:
        """Batched training tensors for positions (indices into self.indices), on device (CPU by
        default); see the module docstring."""
        device = torch.device("cpu") if device is None else torch.device(device)
        raw = self.host_batch(positions, epoch, pin_memory=device.type == "cuda")
        return augment_batch(to_device(raw, device), self.augmentation, channels_last)

    def root_relative_poses(self) -> np.ndarray:
        """(N, 17, 3) float64 root-relative joints of the selected rows, mm; reads no image."""
        joints = self._poses()["joints_3d"].astype(np.float64)
        return joints - joints[:, :1]


def to_device(raw: dict, device: torch.device) -> dict:
    """A host batch on device: one asynchronous copy per tensor when the host memory is pinned."""
    return {k: v.to(device, non_blocking=True) for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------
# epochs: order, shards, batches


def epoch_order(
    n: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    block: int = SHUFFLE_BLOCK,
    buffer_blocks: int = SHUFFLE_BUFFER,
) -> np.ndarray:
    """The order of positions 0..n-1 for one epoch, seeded by (seed, epoch).

    shuffle=False: 0..n-1. shuffle=True: blocks of `block` consecutive positions in random order,
    then the positions within each run of `buffer_blocks` blocks shuffled among themselves
    (module docstring): a full shuffle when n <= block * buffer_blocks."""
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([int(seed), int(epoch)])
    blocks = rng.permutation(-(-n // block))
    order = (blocks[:, None] * block + np.arange(block)).reshape(-1)
    order = order[order < n]
    window = block * buffer_blocks
    for start in range(0, n, window):
        order[start : start + window] = rng.permutation(order[start : start + window])
    return order


def epoch_positions(
    n: int, shuffle: bool, seed: int, epoch: int, epoch_samples: int = 0
) -> np.ndarray:
    """The positions one epoch trains on, in order.

    epoch_samples 0 (or >= n): all n, in epoch_order(seed, epoch). Otherwise epochs are slices of
    m = epoch_samples positions of shuffled passes over the n: with k = n // m slices per pass,
    epoch e takes slice e % k of pass e // k (epoch_order seeded by the pass). The epochs of one
    pass are disjoint, so a run of a few short epochs sees new samples in each; the n - k * m
    positions a pass leaves out fall at other places of the next pass's order."""
    if epoch_samples <= 0 or epoch_samples >= n:
        return epoch_order(n, shuffle, seed, epoch)
    per_pass = n // epoch_samples
    order = epoch_order(n, shuffle, seed, epoch // per_pass)
    start = (epoch % per_pass) * epoch_samples
    return order[start : start + epoch_samples]


def shard_positions(
    n: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    epoch_samples: int = 0,
) -> np.ndarray:
    """This rank's positions for one epoch.

    The epoch's positions (epoch_positions) are made divisible by world_size: drop_last=False pads it by
    wrapping around to its start, drop_last=True drops the remainder. Rank r takes the r-th of
    world_size equal contiguous slices, so all ranks get disjoint (up to the padding) shards of
    equal length, which DDP needs, and each shard keeps the order's contiguous reads."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    order = epoch_positions(n, shuffle, seed, epoch, epoch_samples)
    n = len(order)
    if drop_last:
        order = order[: n - n % world_size]
    else:
        total = -(-n // world_size) * world_size
        order = np.resize(order, total)  # wraps around
    per_rank = len(order) // world_size
    return order[rank * per_rank : (rank + 1) * per_rank]


def host_batches(
    dataset: PoseDataset, chunks, epoch: int, pin_memory: bool = False, window: int = READ_WINDOW
):
    """Host batches (PoseDataset.host_batch) for each chunk of positions, reading the images of
    about `window` samples at a time: the distinct rows of a window are read as contiguous runs."""
    for group in read_windows(chunks, window):
        yield from window_batches(dataset, group, epoch, pin_memory)


def read_windows(chunks, window: int = READ_WINDOW) -> list:
    """The chunks in consecutive groups of about `window` samples (at least one chunk each):
    the images of a group are read together."""
    groups, i = [], 0
    while i < len(chunks):
        j, size = i, 0
        while j < len(chunks) and (j == i or size + len(chunks[j]) <= window):
            size += len(chunks[j])
            j += 1
        groups.append(chunks[i:j])
        i = j
    return groups


def window_batches(dataset: PoseDataset, group, epoch: int, pin_memory: bool = False):
    """The host batches of one group of read_windows: one read of its images, then a batch per
    chunk."""
    images, where = dataset.read_images(np.concatenate(group))
    at = 0
    for chunk in group:
        yield dataset.host_batch(chunk, epoch, pin_memory, images, where[at : at + len(chunk)])
        at += len(chunk)


def batch_chunks(positions: np.ndarray, batch_size: int, drop_last: bool = False) -> list:
    """positions cut into batches of batch_size; the last one shorter unless drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = len(positions) - len(positions) % batch_size if drop_last else len(positions)
    return [positions[s : min(s + batch_size, stop)] for s in range(0, stop, batch_size)]


def device_batches(
    dataset: PoseDataset,
    chunks,
    epoch: int = 0,
    device=None,
    channels_last: bool = False,
    prefetch: int = 2,
    readers: int = 1,
):
    """Training tensors on device for each chunk of positions: the host half runs in a background
    thread, `prefetch` batches ahead (0: in this thread), into pinned memory on CUDA; each batch
    is copied to the device once and augmented there. readers: that many reader threads take the
    read windows in turn (_read_in_turns), and the batches come in the same order."""
    device = torch.device("cpu") if device is None else torch.device(device)
    pin = device.type == "cuda"
    if prefetch > 0:
        raws = _read_in_turns(dataset, read_windows(chunks), epoch, pin, max(readers, 1), prefetch)
    else:
        raws = host_batches(dataset, chunks, epoch, pin_memory=pin)
    for raw in raws:
        yield augment_batch(to_device(raw, device), dataset.augmentation, channels_last)


def iterate_batches(
    dataset: PoseDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    prefetch: int = 2,
    device=None,
    channels_last: bool = False,
    epoch_samples: int = 0,
    readers: int = 1,
):
    """Yields training tensors (device_batches) for this rank's shard of one epoch.

    Shards follow shard_positions (padding by wrapping unless drop_last, so every rank takes the
    same number of steps; epoch_samples as there). drop_last also drops this shard's last
    incomplete batch. readers: host reader threads (device_batches)."""
    shard = shard_positions(
        len(dataset), shuffle, seed, epoch, rank, world_size, drop_last, epoch_samples
    )
    chunks = batch_chunks(shard, batch_size, drop_last)
    yield from device_batches(dataset, chunks, epoch, device, channels_last, prefetch, readers)


def _read_in_turns(dataset: PoseDataset, groups, epoch: int, pin: bool, readers: int, depth: int):
    """The host batches of `groups` (read_windows) from `readers` daemon threads, in order:
    thread t reads groups t, t + readers, ... into a queue of its own, `depth` batches ahead, and
    this generator takes group g from queue g % readers. The batches are those of host_batches,
    in the same order; only the reads overlap (h5py holds its lock during a read, the gathers
    into pinned memory and the draws run beside it). Re-raises a reader's error here."""
    queues = [queue.Queue(maxsize=depth) for _ in range(readers)]
    stop = threading.Event()
    end_of_group = object()

    def reader(t: int):
        q = queues[t]
        try:
            for g in range(t, len(groups), readers):
                for raw in window_batches(dataset, groups[g], epoch, pin):
                    if stop.is_set():
                        return
                    q.put(raw)
                q.put(end_of_group)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    dataset._poses()  # the file handle and the pose cache, made once before the threads share them
    threads = [
        threading.Thread(target=reader, args=(t,), daemon=True, name=f"raypose-reader-{t}")
        for t in range(readers)
    ]
    for thread in threads:
        thread.start()
    try:
        for g in range(len(groups)):
            q = queues[g % readers]
            while True:
                item = q.get()
                if item is end_of_group:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        stop.set()
        for thread, q in zip(threads, queues):
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
