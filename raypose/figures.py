"""PNG figures for the evaluation report: skeletons, error per joint, the sweep's history and the
parameter importances.  matplotlib's Agg canvas on Figure objects (no pyplot state), so the
functions are safe in workers and threads and need no display."""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raypose.skeleton import H36M_SKELETON, Skeleton

DPI = 100
# colours by body side: left limbs, right limbs, centre (spine, head)
LEFT, RIGHT, CENTRE = "tab:blue", "tab:red", "tab:gray"
TRUE_COLOUR = "black"
MAX_SKELETON_SAMPLES = 6


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def _bone_colour(child: int, skeleton: Skeleton) -> str:
    if child in skeleton.joints_left:
        return LEFT
    if child in skeleton.joints_right:
        return RIGHT
    return CENTRE


def _upright(pose: np.ndarray) -> tuple:
    """Camera coordinates (x right, y down, z forward) -> plot axes (x, depth z, height -y)."""
    return pose[:, 0], pose[:, 2], -pose[:, 1]


def skeleton_figure(images, pred, gt, out_path, skeleton: Skeleton = H36M_SKELETON,
                    joints_2d=None) -> Path:
    """For each sample, the crop beside a 3D plot of the predicted (coloured by side) and true
    (black, dashed) skeleton, root-relative, in mm.

    images: [N, H, W, 3] uint8; pred, gt: [N, K, 3] mm, camera coordinates; joints_2d: optional
    [N, K, 2] crop pixels, drawn over the image.  At most MAX_SKELETON_SAMPLES rows are drawn.
    """
    images = np.asarray(images)
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    k = skeleton.num_joints
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] uint8, got shape {images.shape}")
    if pred.shape != gt.shape or pred.shape != (len(images), k, 3):
        raise ValueError(f"pred and gt must both be [N, {k}, 3] with N = {len(images)} images; "
                         f"got {pred.shape} and {gt.shape}")
    if joints_2d is not None:
        joints_2d = np.asarray(joints_2d, dtype=np.float64)
        if joints_2d.shape != (len(images), k, 2):
            raise ValueError(f"joints_2d must be [N, {k}, 2], got {joints_2d.shape}")
    n = min(len(images), MAX_SKELETON_SAMPLES)
    if n == 0:
        raise ValueError("skeleton_figure needs at least one sample")
    pred = pred[:n] - pred[:n, :1]
    gt = gt[:n] - gt[:n, :1]
    # one cube for all rows so that the plots compare at the same scale
    half = 1.05 * max(np.abs(pred).max(), np.abs(gt).max(), 1.0)

    fig = _new_figure(7.0, 3.2 * n)
    grid = fig.add_gridspec(n, 2, width_ratios=(1.0, 1.35))
    for row in range(n):
        ax_img = fig.add_subplot(grid[row, 0])
        ax_img.imshow(images[row].astype(np.uint8) if images.dtype != np.uint8 else images[row])
        if joints_2d is not None:
            for child, parent in skeleton.bones():
                seg = joints_2d[row, [parent, child]]
                ax_img.plot(seg[:, 0], seg[:, 1], color=_bone_colour(child, skeleton), lw=1.5)
            ax_img.scatter(joints_2d[row, :, 0], joints_2d[row, :, 1], s=6, c="white", zorder=3)
        error = np.linalg.norm(pred[row] - gt[row], axis=-1).mean()
        ax_img.set_title(f"sample {row}: MPJPE {error:.1f} mm", fontsize=9)
        ax_img.axis("off")

        ax = fig.add_subplot(grid[row, 1], projection="3d")
        for pose, style in ((gt[row], "true"), (pred[row], "pred")):
            x, depth, height = _upright(pose)
            for child, parent in skeleton.bones():
                idx = [parent, child]
                if style == "true":
                    ax.plot(x[idx], depth[idx], height[idx], color=TRUE_COLOUR, lw=1.2, ls="--")
                else:
                    ax.plot(x[idx], depth[idx], height[idx], color=_bone_colour(child, skeleton), lw=2)
        ax.set_xlim(-half, half)
        ax.set_ylim(-half, half)
        ax.set_zlim(-half, half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=15, azim=-70)  # a little from above and to the side; z (height) up
        ax.set_xlabel("x (mm)", fontsize=7)
        ax.set_ylabel("z (mm)", fontsize=7)
        ax.set_zlabel("-y (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
        if row == 0:
            ax.plot([], [], color=TRUE_COLOUR, ls="--", label="true")
            ax.plot([], [], color=LEFT, label="pred (left)")
            ax.plot([], [], color=RIGHT, label="pred (right)")
            ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return _save(fig, out_path)


def joint_error_figure(per_joint: dict, out_path, baseline=None) -> Path:
    """Bar chart of the error per joint (mm).

    per_joint: {joint name: mm}; baseline: optional, another {joint name: mm} drawn as a second
    bar per joint, or one number (e.g. the mean-pose baseline's MPJPE) drawn as a line."""
    if not per_joint:
        raise ValueError("joint_error_figure needs at least one joint")
    names = list(per_joint)
    values = np.array([float(per_joint[n]) for n in names])
    x = np.arange(len(names))
    fig = _new_figure(max(6.0, 0.4 * len(names) + 1.5), 4.0)
    ax = fig.add_subplot()
    if isinstance(baseline, dict):
        missing = [n for n in names if n not in baseline]
        if missing:
            raise ValueError(f"baseline has no value for joints {missing}")
        width = 0.4
        ax.bar(x - width / 2, values, width, color="tab:blue", label="model")
        ax.bar(x + width / 2, [float(baseline[n]) for n in names], width, color="tab:gray",
               label="baseline")
        ax.legend(fontsize=8)
    else:
        ax.bar(x, values, 0.7, color="tab:blue", label="model")
        if baseline is not None:
            ax.axhline(float(baseline), color="tab:red", ls="--", label=f"baseline {float(baseline):.1f} mm")
            ax.legend(fontsize=8)
    ax.axhline(values.mean(), color="black", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("error (mm)")
    ax.set_title(f"error per joint (mean {values.mean():.1f} mm)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def _state_name(state) -> str:
    """'COMPLETE' from 'COMPLETE', 'complete', 'TrialState.COMPLETE' or optuna's TrialState."""
    return str(getattr(state, "name", state)).rsplit(".", 1)[-1].upper()


def sweep_history_figure(trials: list, out_path, metric: str = "val_mpjpe") -> Path:
    """The objective of each trial and the best so far (minimised).

    trials: [{'number': int, 'value': float | None, 'params': dict, 'state': str or TrialState}];
    finished trials are dots, pruned ones triangles (at their last value), the rest are counted in
    the title."""
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    rows = sorted(trials, key=lambda t: t["number"])
    done = [(t["number"], float(t["value"])) for t in rows
            if _state_name(t["state"]) == "COMPLETE" and t.get("value") is not None]
    pruned = [(t["number"], float(t["value"])) for t in rows
              if _state_name(t["state"]) == "PRUNED" and t.get("value") is not None]
    others = len(rows) - len(done) - len(pruned)
    if done:
        numbers, values = np.array(done).T
        ax.scatter(numbers, values, color="tab:blue", s=25, label="complete", zorder=3)
        best = np.minimum.accumulate(values)
        ax.step(numbers, best, where="post", color="tab:red", lw=1.5,
                label=f"best so far ({best[-1]:.1f})")
    if pruned:
        numbers, values = np.array(pruned).T
        ax.scatter(numbers, values, marker="v", color="tab:orange", s=25, label="pruned", zorder=3)
    if not done and not pruned:
        ax.text(0.5, 0.5, "no trial has reported a value yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=11)
    else:
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (lower is better)")
    title = f"sweep: {len(rows)} trials, {len(done)} complete, {len(pruned)} pruned"
    ax.set_title(title + (f", {others} other" if others else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def param_importance_figure(importances: dict | None, out_path, note: str | None = None) -> Path:
    """Horizontal bars of each parameter's importance, largest on top.

    importances: {name: importance} from optuna.importance.get_param_importances, or empty/None
    when they could not be computed; then the figure carries a note instead (the given one or a
    default about needing two finished trials)."""
    fig = _new_figure(6.4, 0.35 * max(len(importances or {}), 4) + 1.5)
    ax = fig.add_subplot()
    if not importances:
        ax.text(0.5, 0.5, note or "parameter importances need at least 2 finished trials",
                ha="center", va="center", transform=ax.transAxes, fontsize=11, wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("parameter importance", fontsize=10)
    else:
        items = sorted(importances.items(), key=lambda kv: kv[1])  # barh draws bottom-up
        names = [k for k, _ in items]
        values = [float(v) for _, v in items]
        y = np.arange(len(items))
        ax.barh(y, values, color="tab:blue")
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xlim(0, max(max(values) * 1.2, 1e-9))
        ax.set_xlabel("importance")
        ax.set_title("parameter importance" + (f" ({note})" if note else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def param_importances(study) -> dict:
    """optuna.importance.get_param_importances, or {} where it cannot say anything (fewer than two
    finished trials, or no parameter shared by them)."""
    import optuna

    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}
