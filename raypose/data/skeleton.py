"""The 17-joint Human3.6M skeleton and the parent-relative encoding of PAPER.md."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Skeleton:
    names: tuple
    parents: tuple  # parents[i] is the parent joint of i; -1 for the root
    joints_left: tuple
    joints_right: tuple

    @property
    def num_joints(self) -> int:
        return len(self.parents)

    def flip_permutation(self) -> np.ndarray:
        """Index array that swaps every left joint with its right twin (used after mirroring x)."""
        perm = np.arange(self.num_joints)
        perm[list(self.joints_left)] = self.joints_right
        perm[list(self.joints_right)] = self.joints_left
        return perm

    def bones(self):
        """(child, parent) pairs, one per non-root joint."""
        return [(j, p) for j, p in enumerate(self.parents) if p >= 0]


H36M_SKELETON = Skeleton(
    names=(
        "Hip",
        "RHip",
        "RKnee",
        "RFoot",
        "LHip",
        "LKnee",
        "LFoot",
        "Spine",
        "Thorax",
        "Neck",
        "Head",
        "LShoulder",
        "LElbow",
        "LWrist",
        "RShoulder",
        "RElbow",
        "RWrist",
    ),
    parents=(-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15),
    joints_left=(4, 5, 6, 11, 12, 13),
    joints_right=(1, 2, 3, 14, 15, 16),
)

# Regression targets are parent-relative offsets divided by this many mm so that they fit tanh
# (the first author's code uses 1200 mm).
OFFSET_SCALE_MM = 1200.0


def _check_parents_topological(parents) -> None:
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"skeleton parents must precede children; joint {j} has parent {p}")


def parent_relative(joints: np.ndarray, skeleton: Skeleton = H36M_SKELETON) -> np.ndarray:
    """R_i = J_i - J_parent(i), with R_root = 0.  joints: (..., J, 3) -> (..., J, 3).

    Works on numpy arrays and on torch tensors (a tensor stays a tensor, on its device)."""
    if not hasattr(joints, "shape"):  # lists; numpy arrays and torch tensors pass through
        joints = np.asarray(joints)
    assert joints.shape[-2] == skeleton.num_joints, joints.shape
    parents = np.array(skeleton.parents)
    parent_idx = np.where(parents < 0, np.arange(len(parents)), parents)  # root is its own parent
    return joints - joints[..., parent_idx, :]


def from_parent_relative(offsets: np.ndarray, skeleton: Skeleton = H36M_SKELETON) -> np.ndarray:
    """Inverse of parent_relative for root-relative poses: cumulative sum down the kinematic tree.

    offsets: (..., J, 3) -> root-relative positions (..., J, 3); the root comes out at 0.
    Works on numpy arrays and on torch tensors.
    """
    _check_parents_topological(skeleton.parents)
    assert offsets.shape[-2] == skeleton.num_joints, offsets.shape
    out = [None] * skeleton.num_joints
    out[0] = offsets[..., 0, :] * 0
    for j in range(1, skeleton.num_joints):
        out[j] = out[skeleton.parents[j]] + offsets[..., j, :]
    if isinstance(offsets, np.ndarray):
        return np.stack(out, axis=-2)
    import torch

    return torch.stack(out, dim=-2)


def root_relative(joints: np.ndarray) -> np.ndarray:
    """Subtract the root (joint 0).  (..., J, 3) -> (..., J, 3)."""
    return joints - joints[..., :1, :]
