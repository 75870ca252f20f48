"""The skeleton data object and the parent-relative encoding, with hand-computed numbers."""

import numpy as np
import pytest
import torch

from raypose.data.skeleton import (
    H36M_SKELETON,
    OFFSET_SCALE_MM,
    Skeleton,
    from_parent_relative,
    parent_relative,
    root_relative,
)

# A standing pose in camera coordinates (mm; x right, y down, z forward), root at (10, 0, 3000).
HAND_POSE = np.array(
    [
        [10, 0, 3000],  # 0 Hip
        [-120, 0, 3000],  # 1 RHip
        [-120, 450, 3000],  # 2 RKnee
        [-120, 900, 3050],  # 3 RFoot
        [140, 0, 3000],  # 4 LHip
        [140, 450, 2990],  # 5 LKnee
        [140, 900, 3000],  # 6 LFoot
        [10, -230, 3000],  # 7 Spine
        [10, -480, 3010],  # 8 Thorax
        [10, -580, 3000],  # 9 Neck
        [10, -700, 3000],  # 10 Head
        [160, -480, 3010],  # 11 LShoulder
        [160, -200, 3010],  # 12 LElbow
        [160, 50, 2900],  # 13 LWrist
        [-140, -480, 3010],  # 14 RShoulder
        [-140, -200, 3010],  # 15 RElbow
        [-140, 50, 3100],  # 16 RWrist
    ],
    dtype=np.float64,
)

# J_i - J_parent(i), worked out by hand from HAND_POSE and PAPER.md's parents.
HAND_OFFSETS = np.array(
    [
        [0, 0, 0],  # 0 Hip: the root is its own parent
        [-130, 0, 0],  # 1 RHip - Hip
        [0, 450, 0],  # 2 RKnee - RHip
        [0, 450, 50],  # 3 RFoot - RKnee
        [130, 0, 0],  # 4 LHip - Hip
        [0, 450, -10],  # 5 LKnee - LHip
        [0, 450, 10],  # 6 LFoot - LKnee
        [0, -230, 0],  # 7 Spine - Hip
        [0, -250, 10],  # 8 Thorax - Spine
        [0, -100, -10],  # 9 Neck - Thorax
        [0, -120, 0],  # 10 Head - Neck
        [150, 0, 0],  # 11 LShoulder - Thorax
        [0, 280, 0],  # 12 LElbow - LShoulder
        [0, 250, -110],  # 13 LWrist - LElbow
        [-150, 0, 0],  # 14 RShoulder - Thorax
        [0, 280, 0],  # 15 RElbow - RShoulder
        [0, 250, 90],  # 16 RWrist - RElbow
    ],
    dtype=np.float64,
)


def test_h36m_skeleton_matches_paper():
    assert H36M_SKELETON.num_joints == 17
    assert H36M_SKELETON.parents == (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)
    assert H36M_SKELETON.joints_left == (4, 5, 6, 11, 12, 13)
    assert H36M_SKELETON.joints_right == (1, 2, 3, 14, 15, 16)
    assert len(H36M_SKELETON.bones()) == 16
    assert (16, 15) in H36M_SKELETON.bones() and (0, -1) not in H36M_SKELETON.bones()
    assert OFFSET_SCALE_MM == 1200.0


def test_parent_relative_hand_example():
    np.testing.assert_array_equal(parent_relative(HAND_POSE), HAND_OFFSETS)


def test_from_parent_relative_hand_example():
    decoded = from_parent_relative(HAND_OFFSETS)
    np.testing.assert_array_equal(decoded[0], [0, 0, 0])
    np.testing.assert_array_equal(decoded[10], [0, -700, 0])  # Head: -230 - 250 - 100 - 120 in y
    np.testing.assert_array_equal(decoded[16], [-150, 50, 100])  # RWrist: 10 + 90 in z
    np.testing.assert_array_equal(decoded, HAND_POSE - HAND_POSE[0])


def test_round_trip_numpy_is_exact():
    # integer-valued mm are exact in float64, so the cumulative sum must give back the same bits
    rng = np.random.default_rng(0)
    joints = rng.integers(-2000, 2000, size=(5, 4, 17, 3)).astype(np.float64)
    offsets = parent_relative(joints)
    assert offsets.shape == joints.shape
    np.testing.assert_array_equal(offsets[..., 0, :], 0)
    np.testing.assert_array_equal(from_parent_relative(offsets), root_relative(joints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_torch_is_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    joints = torch.randint(-2000, 2000, (6, 17, 3), generator=gen).to(dtype)
    offsets = parent_relative(joints)
    assert isinstance(offsets, torch.Tensor) and offsets.dtype == dtype
    decoded = from_parent_relative(offsets)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == dtype
    assert torch.equal(decoded, joints - joints[:, :1])
    # the same numbers as the numpy path
    np.testing.assert_array_equal(offsets.numpy(), parent_relative(joints.numpy()))


def test_torch_round_trip_keeps_gradients():
    joints = torch.tensor(HAND_POSE, requires_grad=True)
    decoded = from_parent_relative(parent_relative(joints))
    decoded.sum().backward()
    assert joints.grad is not None


def test_flip_permutation_swaps_exactly_left_and_right():
    perm = H36M_SKELETON.flip_permutation()
    np.testing.assert_array_equal(perm, [0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13])
    np.testing.assert_array_equal(perm[perm], np.arange(17))  # an involution
    names = H36M_SKELETON.names
    for i, j in enumerate(perm):
        if i in H36M_SKELETON.joints_left + H36M_SKELETON.joints_right:
            assert {names[i][0], names[j][0]} == {"L", "R"} and names[i][1:] == names[j][1:]
        else:
            assert j == i  # centre joints stay put


def test_flip_permutation_on_a_small_skeleton():
    sk = Skeleton(
        names=("root", "l", "r", "mid"), parents=(-1, 0, 0, 0), joints_left=(1,), joints_right=(2,)
    )
    np.testing.assert_array_equal(sk.flip_permutation(), [0, 2, 1, 3])


def test_parents_must_precede_children():
    sk = Skeleton(names=("a", "b", "c"), parents=(-1, 2, 0), joints_left=(), joints_right=())
    with pytest.raises(ValueError, match="joint 1 has parent 2"):
        from_parent_relative(np.zeros((3, 3)), sk)
