"""Pose error metrics (pure numpy).  Poses are [N, K, 3] arrays in mm."""

import numpy as np

ALIGNMENTS = ("none", "procrustes", "scale")


def _check(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"pred and gt must both be [N, K, 3]; got {pred.shape} and {gt.shape}")


def align(pred: np.ndarray, gt: np.ndarray, alignment: str = "none") -> np.ndarray:
    """Align each predicted pose to its ground truth.

    'none'       root alignment only (joint 0 of pred moved onto joint 0 of gt): Protocol #1.
    'procrustes' similarity transform (scale, rotation, translation; reflections excluded) that
                 minimises the squared error: Protocol #2.
    'scale'      root alignment, then the least-squares scale s = <gt, pred> / <pred, pred>: N-MPJPE.
    pred, gt: [N, K, 3] -> aligned pred [N, K, 3].
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    _check(pred, gt)
    if alignment == "none":
        return pred - pred[:, :1] + gt[:, :1]
    if alignment == "scale":
        p = pred - pred[:, :1]
        g = gt - gt[:, :1]
        s = (g * p).sum(axis=(1, 2)) / np.maximum((p * p).sum(axis=(1, 2)), 1e-12)
        return s[:, None, None] * p + gt[:, :1]
    if alignment == "procrustes":
        mu_p = pred.mean(axis=1, keepdims=True)
        mu_g = gt.mean(axis=1, keepdims=True)
        p = pred - mu_p
        g = gt - mu_g
        # Umeyama: R maximises tr(R^T H) with H = p^T g; the sign fix excludes reflections
        h = np.einsum("nki,nkj->nij", p, g)  # [N, 3, 3]
        u, sigma, vt = np.linalg.svd(h)
        d = np.sign(np.linalg.det(np.einsum("nij,njk->nik", u, vt)))  # [N]
        fix = np.ones((len(d), 3))
        fix[:, 2] = d
        rot = np.einsum("nij,nj,njk->nik", u, fix, vt)  # p @ rot approximates g up to scale
        scale = (sigma * fix).sum(axis=1) / np.maximum((p * p).sum(axis=(1, 2)), 1e-12)
        return scale[:, None, None] * np.einsum("nki,nij->nkj", p, rot) + mu_g
    raise ValueError(f"unknown alignment {alignment!r}; expected one of {ALIGNMENTS}")


def per_joint_error(pred: np.ndarray, gt: np.ndarray, alignment: str = "none") -> np.ndarray:
    """Euclidean error of each joint after alignment.  [N, K, 3] -> [N, K] (mm)."""
    aligned = align(pred, gt, alignment)
    return np.linalg.norm(aligned - np.asarray(gt, dtype=np.float64), axis=-1)


def mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Protocol #1: mean per-joint position error after aligning roots (mm)."""
    return float(per_joint_error(pred, gt, "none").mean())


def p_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Protocol #2: MPJPE after a similarity Procrustes alignment without reflection (mm)."""
    return float(per_joint_error(pred, gt, "procrustes").mean())


def n_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """N-MPJPE: MPJPE after root alignment and a least-squares scale (mm)."""
    return float(per_joint_error(pred, gt, "scale").mean())


def mean_pose_baseline(train_poses: np.ndarray, test_poses: np.ndarray) -> float:
    """MPJPE of always predicting the training set's mean root-relative pose.  [N, K, 3] each."""
    train_poses = np.asarray(train_poses, dtype=np.float64)
    test_poses = np.asarray(test_poses, dtype=np.float64)
    mean_pose = (train_poses - train_poses[:, :1]).mean(axis=0, keepdims=True)
    return mpjpe(np.broadcast_to(mean_pose, test_poses.shape).copy(), test_poses)


def body_size(poses: np.ndarray, parents) -> np.ndarray:
    """Each pose's summed bone length (mm): the size of the body, whatever its pose.
    poses: [N, K, 3]; parents[k] is joint k's parent, -1 for the root -> [N]."""
    poses = np.asarray(poses, dtype=np.float64)
    bones = [(k, p) for k, p in enumerate(parents) if p >= 0]
    child = [k for k, _ in bones]
    parent = [p for _, p in bones]
    return np.linalg.norm(poses[:, child] - poses[:, parent], axis=-1).sum(axis=1)


def grouped_report(pred: np.ndarray, gt: np.ndarray, groups, joint_names) -> dict:
    """MPJPE, P-MPJPE and N-MPJPE per group (e.g. action), per joint, and the mean over groups.

    pred, gt: [N, K, 3]; groups: N labels.  The mean over groups weights each group equally,
    as the per-action tables of PAPER.md do.
    """
    groups = np.asarray(groups)
    errors = {
        name: per_joint_error(pred, gt, a)
        for name, a in (("mpjpe", "none"), ("p_mpjpe", "procrustes"), ("n_mpjpe", "scale"))
    }
    per_group = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        per_group[str(g)] = {name: float(e[sel].mean()) for name, e in errors.items()}
        per_group[str(g)]["std_mpjpe"] = float(errors["mpjpe"][sel].mean(axis=1).std())
        per_group[str(g)]["count"] = int(sel.sum())
    return {
        "per_action": per_group,
        "per_joint": {
            name: {j: float(e[:, k].mean()) for k, j in enumerate(joint_names)}
            for name, e in errors.items()
        },
        "mean_over_actions": {
            name: float(np.mean([v[name] for v in per_group.values()])) for name in errors
        },
        "overall": {name: float(e.mean()) for name, e in errors.items()},
    }
