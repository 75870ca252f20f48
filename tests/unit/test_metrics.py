"""MPJPE (Protocol #1), P-MPJPE (Protocol #2) and N-MPJPE on tiny poses with hand-computed numbers."""

import math

import numpy as np
import pytest

from raypose.model.metrics import (
    align,
    body_size,
    grouped_report,
    mean_pose_baseline,
    mpjpe,
    n_mpjpe,
    p_mpjpe,
    per_joint_error,
)


def _rotation(seed: int) -> np.ndarray:
    """A proper rotation (det +1) from a random orthogonal matrix."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# a non-planar pose with all six edge lengths different (100, 200, 300, 100*sqrt(5, 10, 13)): chiral
TETRAHEDRON = np.array([[[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 200.0, 0.0], [0.0, 0.0, 300.0]]])


def test_mpjpe_hand_computed():
    # sample 0: pred root at (10, 20, 30); after root alignment joint 1 is (130, 40, 0) vs
    #           (100, 0, 0): error |(30, 40, 0)| = 50
    # sample 1: joint 1 off by 12 in z
    gt = np.array([[[0, 0, 0], [100, 0, 0]], [[0, 0, 0], [0, 100, 0]]], dtype=float)
    pred = np.array([[[10, 20, 30], [140, 60, 30]], [[0, 0, 0], [0, 100, 12]]], dtype=float)
    np.testing.assert_allclose(per_joint_error(pred, gt), [[0, 50], [0, 12]])
    assert mpjpe(pred, gt) == pytest.approx((0 + 50 + 0 + 12) / 4)


def test_mpjpe_aligns_roots_of_both_poses():
    gt = np.array([[[1000, 0, 5000], [1100, 0, 5000]]], dtype=float)
    pred = np.array([[[0, 0, 0], [100, 0, 0]]], dtype=float)
    assert mpjpe(pred, gt) == 0.0


def test_n_mpjpe_hand_computed():
    # root-relative gt g and pred p: <g, p> = 100*50 + 100*50 = 10000, <p, p> = 3 * 50^2 = 7500
    # s = 4/3: scaled joint 1 = (200/3, 0, 0), joint 2 = (0, 200/3, 200/3)
    # errors: 0, 100/3, sqrt((100/3)^2 + (200/3)^2) = 100*sqrt(5)/3
    gt = np.array([[[0, 0, 0], [100, 0, 0], [0, 100, 0]]], dtype=float)
    pred = np.array([[[0, 0, 0], [50, 0, 0], [0, 50, 50]]], dtype=float)
    np.testing.assert_allclose(
        per_joint_error(pred, gt, "scale"), [[0, 100 / 3, 100 * math.sqrt(5) / 3]]
    )
    assert n_mpjpe(pred, gt) == pytest.approx(100 * (1 + math.sqrt(5)) / 9)
    # without the scale: errors 0, 50, 50*sqrt(2)
    assert mpjpe(pred, gt) == pytest.approx((50 + 50 * math.sqrt(2)) / 3)


def test_n_mpjpe_is_zero_for_a_scaled_copy():
    rng = np.random.default_rng(0)
    gt = rng.normal(scale=300, size=(4, 17, 3))
    pred = 0.6 * (gt - gt[:, :1]) + np.array([50.0, -20.0, 4000.0])
    assert n_mpjpe(pred, gt) < 1e-9
    assert mpjpe(pred, gt) > 10


def test_p_mpjpe_hand_computed():
    # centred square vs a squashed one: H = p^T g = diag(20000, 10000, 0) so R = I;
    # s = (20000 + 10000) / |p|^2 = 30000 / 25000 = 1.2: pred becomes (+-120, 0), (0, +-60)
    # errors 20, 20, 40, 40 -> 30
    gt = np.array([[[100, 0, 0], [-100, 0, 0], [0, 100, 0], [0, -100, 0]]], dtype=float)
    pred = np.array([[[100, 0, 0], [-100, 0, 0], [0, 50, 0], [0, -50, 0]]], dtype=float)
    np.testing.assert_allclose(
        align(pred, gt, "procrustes"),
        [[[120, 0, 0], [-120, 0, 0], [0, 60, 0], [0, -60, 0]]],
        atol=1e-9,
    )
    assert p_mpjpe(pred, gt) == pytest.approx(30.0)
    # the same number after moving, turning and scaling the prediction
    moved = 0.5 * pred @ _rotation(3).T + np.array([7.0, -300.0, 2500.0])
    assert p_mpjpe(moved, gt) == pytest.approx(30.0)


def test_p_mpjpe_is_zero_for_a_rotated_scaled_translated_copy():
    rng = np.random.default_rng(1)
    gt = rng.normal(scale=300, size=(5, 17, 3))
    rotations = np.stack([_rotation(s) for s in range(5)])
    pred = 1.7 * np.einsum("nij,nkj->nki", rotations, gt) + rng.normal(scale=1000, size=(5, 1, 3))
    assert p_mpjpe(pred, gt) < 1e-6
    assert mpjpe(pred, gt) > 10  # the copy is far off before alignment


def test_p_mpjpe_excludes_reflections():
    mirrored = TETRAHEDRON * np.array([-1.0, 1.0, 1.0])  # x -> -x
    assert p_mpjpe(mirrored, TETRAHEDRON) > 10.0
    # mirrored and then rotated is still not reachable by a rotation
    turned = mirrored @ _rotation(0).T
    assert p_mpjpe(turned, TETRAHEDRON) > 10.0
    # the aligned pose is a proper rotation: its orientation (sign of the triple product) is kept
    aligned = align(mirrored, TETRAHEDRON, "procrustes")[0]
    edges = aligned[1:] - aligned[0]
    assert np.linalg.det(edges) * np.linalg.det(mirrored[0, 1:] - mirrored[0, 0]) > 0


def test_alignments_are_ordered_on_random_poses():
    # Procrustes minimises the squared error over a larger family than scale, scale than none
    rng = np.random.default_rng(2)
    gt = rng.normal(scale=200, size=(8, 17, 3))
    pred = gt + rng.normal(scale=60, size=gt.shape)

    def sq(alignment):
        return ((align(pred, gt, alignment) - gt) ** 2).sum()

    assert sq("procrustes") <= sq("scale") + 1e-6 <= sq("none") + 2e-6


def test_mean_pose_baseline_hand_computed():
    # train root-relative poses: [(0,0,0), (100,0,0)] and [(0,0,0), (0,100,0)] -> mean (50,50,0)
    train = np.array([[[5, 5, 5], [105, 5, 5]], [[10, 0, 0], [10, 100, 0]]], dtype=float)
    # test 0: joint 1 at (50, 50, 30) root-relative: error 30
    # test 1: joint 1 at (50, -50, 0) root-relative: error 100
    test = np.array([[[0, 0, 0], [50, 50, 30]], [[7, 7, 7], [57, -43, 7]]], dtype=float)
    assert mean_pose_baseline(train, test) == pytest.approx((0 + 30 + 0 + 100) / 4)


def test_grouped_report_hand_computed():
    # 'a': one sample, joint 1 off by 20 -> MPJPE 10; 'b': two samples off by 80 -> MPJPE 40
    gt = np.tile(np.array([[0, 0, 0], [100, 0, 0]], dtype=float), (3, 1, 1))
    pred = gt.copy()
    pred[0, 1] += [20, 0, 0]
    pred[1:, 1] += [0, 80, 0]
    report = grouped_report(pred, gt, ["a", "b", "b"], ["Hip", "Hand"])
    assert report["per_action"]["a"]["mpjpe"] == pytest.approx(10)
    assert report["per_action"]["b"]["mpjpe"] == pytest.approx(40)
    assert report["per_action"]["b"]["std_mpjpe"] == pytest.approx(0)
    assert report["per_action"]["b"]["count"] == 2
    assert report["mean_over_actions"]["mpjpe"] == pytest.approx(25)  # each action weighs the same
    assert report["overall"]["mpjpe"] == pytest.approx(30)  # each sample weighs the same
    assert report["per_joint"]["mpjpe"] == pytest.approx({"Hip": 0, "Hand": 60})


def test_grouped_report_agrees_with_direct_calls():
    rng = np.random.default_rng(3)
    gt = rng.normal(scale=250, size=(9, 17, 3))
    pred = gt + rng.normal(scale=40, size=gt.shape)
    groups = np.array(["walk", "eat", "walk", "sit", "walk", "eat", "walk", "walk", "sit"])
    names = [f"j{k}" for k in range(17)]
    report = grouped_report(pred, gt, groups, names)
    assert sorted(report["per_action"]) == ["eat", "sit", "walk"]
    for g, row in report["per_action"].items():
        sel = groups == g
        assert row["mpjpe"] == pytest.approx(mpjpe(pred[sel], gt[sel]))
        assert row["p_mpjpe"] == pytest.approx(p_mpjpe(pred[sel], gt[sel]))
        assert row["n_mpjpe"] == pytest.approx(n_mpjpe(pred[sel], gt[sel]))
        assert row["std_mpjpe"] == pytest.approx(per_joint_error(pred[sel], gt[sel]).mean(1).std())
        assert row["count"] == sel.sum()
    for name, fn, alignment in (
        ("mpjpe", mpjpe, "none"),
        ("p_mpjpe", p_mpjpe, "procrustes"),
        ("n_mpjpe", n_mpjpe, "scale"),
    ):
        assert report["overall"][name] == pytest.approx(fn(pred, gt))
        assert report["mean_over_actions"][name] == pytest.approx(
            np.mean([report["per_action"][g][name] for g in ("eat", "sit", "walk")])
        )
        per_joint = per_joint_error(pred, gt, alignment).mean(axis=0)
        assert [report["per_joint"][name][j] for j in names] == pytest.approx(per_joint.tolist())
    # group sizes differ, so the two means differ
    assert report["mean_over_actions"]["mpjpe"] != pytest.approx(report["overall"]["mpjpe"])


@pytest.mark.parametrize(
    "pred_shape, gt_shape",
    [
        ((2, 17, 3), (2, 16, 3)),
        ((17, 3), (17, 3)),
        ((2, 17, 2), (2, 17, 2)),
        ((1, 17, 3), (2, 17, 3)),
    ],
)
def test_bad_shapes_raise(pred_shape, gt_shape):
    for fn in (mpjpe, p_mpjpe, n_mpjpe):
        with pytest.raises(ValueError, match=r"\[N, K, 3\]"):
            fn(np.zeros(pred_shape), np.zeros(gt_shape))


def test_unknown_alignment_raises():
    with pytest.raises(ValueError, match="unknown alignment 'rigid'"):
        align(TETRAHEDRON, TETRAHEDRON, "rigid")
    with pytest.raises(ValueError, match="unknown alignment"):
        per_joint_error(TETRAHEDRON, TETRAHEDRON, "Procrustes")


def test_body_size_sums_bone_lengths_and_ignores_the_pose():
    # a chain root -> 1 -> 2 with bones of 30 and 40 mm, and joint 3 hanging off the root (50 mm)
    parents = (-1, 0, 1, 0)
    stretched = np.array([[[0, 0, 0], [30, 0, 0], [30, 40, 0], [0, 0, 50]]], dtype=float)
    bent = np.array([[[5, 5, 5], [5, 35, 5], [5, 35, 45], [-45, 5, 5]]], dtype=float)
    assert body_size(stretched, parents) == pytest.approx([120])
    assert body_size(np.concatenate([stretched, 2 * bent]), parents) == pytest.approx([120, 240])
