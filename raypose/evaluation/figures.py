"""PNG figures for the evaluation report: skeletons, error per joint, the sweep's history and the
parameter importances.  matplotlib's Agg canvas on Figure objects (no pyplot state), so the
functions are safe in workers and threads and need no display."""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from raypose.data.skeleton import H36M_SKELETON, Skeleton

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


def skeleton_figure(
    images, pred, gt, out_path, skeleton: Skeleton = H36M_SKELETON, joints_2d=None
) -> Path:
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
        raise ValueError(
            f"pred and gt must both be [N, {k}, 3] with N = {len(images)} images; "
            f"got {pred.shape} and {gt.shape}"
        )
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
        _draw_skeleton_3d(ax, gt[row], skeleton, true=True)
        _draw_skeleton_3d(ax, pred[row], skeleton)
        # a little from above and to the side; z (height) up
        _frame_3d(ax, half, elev=15, azim=-70)
        if row == 0:
            _legend_3d(ax, with_true=True)
    fig.tight_layout()
    return _save(fig, out_path)


def _draw_skeleton_3d(ax, pose: np.ndarray, skeleton: Skeleton, true: bool = False) -> None:
    """One pose's bones on a 3D axis: a true pose black and dashed, a predicted one by side."""
    x, depth, height = _upright(pose)
    for child, parent in skeleton.bones():
        idx = [parent, child]
        if true:
            ax.plot(x[idx], depth[idx], height[idx], color=TRUE_COLOUR, lw=1.2, ls="--")
        else:
            ax.plot(x[idx], depth[idx], height[idx], color=_bone_colour(child, skeleton), lw=2)


def _frame_3d(ax, half: float, elev: float, azim: float) -> None:
    """The same cube of +-half mm on every axis, seen from (elev, azim) degrees."""
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_zlim(-half, half)
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("x (mm)", fontsize=7)
    ax.set_ylabel("z (mm)", fontsize=7)
    ax.set_zlabel("-y (mm)", fontsize=7)
    ax.tick_params(labelsize=6)


def _legend_3d(ax, with_true: bool) -> None:
    if with_true:
        ax.plot([], [], color=TRUE_COLOUR, ls="--", label="true")
    ax.plot([], [], color=LEFT, label="pred (left)")
    ax.plot([], [], color=RIGHT, label="pred (right)")
    ax.legend(loc="upper left", fontsize=7)


# the two views of prediction_figure: (title, elevation, azimuth) in degrees. Plot axes are
# (x, depth z, height -y): azimuth -90 looks along +z, as the camera does; 0 looks from the side
PREDICTION_VIEWS = (("camera view", 10, -90), ("side view", 10, 0))


def prediction_figure(
    image, pred, out_path, title: str = "", gt=None, skeleton: Skeleton = H36M_SKELETON
) -> Path:
    """One input of `raypose predict`: the crop the network saw beside the predicted skeleton
    (root-relative, mm, coloured by side) from two views (PREDICTION_VIEWS), with the true
    skeleton dashed when gt is given.

    image: [H, W, 3] uint8; pred, gt: [K, 3] mm, camera coordinates."""
    image = np.asarray(image)
    pred = np.asarray(pred, dtype=np.float64)
    k = skeleton.num_joints
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got shape {image.shape}")
    if pred.shape != (k, 3):
        raise ValueError(f"pred must be [{k}, 3], got {pred.shape}")
    pred = pred - pred[:1]
    if gt is not None:
        gt = np.asarray(gt, dtype=np.float64)
        if gt.shape != (k, 3):
            raise ValueError(f"gt must be [{k}, 3], got {gt.shape}")
        gt = gt - gt[:1]
    half = 1.05 * max(np.abs(pred).max(), 0.0 if gt is None else np.abs(gt).max(), 1.0)

    fig = _new_figure(10.0, 3.6)
    grid = fig.add_gridspec(1, 3, width_ratios=(1.0, 1.3, 1.3))
    ax_img = fig.add_subplot(grid[0, 0])
    ax_img.imshow(image.astype(np.uint8))
    ax_img.set_title(title, fontsize=9)
    ax_img.axis("off")
    for column, (view, elev, azim) in enumerate(PREDICTION_VIEWS, start=1):
        ax = fig.add_subplot(grid[0, column], projection="3d")
        if gt is not None:
            _draw_skeleton_3d(ax, gt, skeleton, true=True)
        _draw_skeleton_3d(ax, pred, skeleton)
        _frame_3d(ax, half, elev=elev, azim=azim)
        ax.set_title(view, fontsize=9)
        if column == 1:
            _legend_3d(ax, with_true=gt is not None)
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
        ax.bar(
            x + width / 2,
            [float(baseline[n]) for n in names],
            width,
            color="tab:gray",
            label="baseline",
        )
        ax.legend(fontsize=8)
    else:
        ax.bar(x, values, 0.7, color="tab:blue", label="model")
        if baseline is not None:
            ax.axhline(
                float(baseline),
                color="tab:red",
                ls="--",
                label=f"baseline {float(baseline):.1f} mm",
            )
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
    done = [
        (t["number"], float(t["value"]))
        for t in rows
        if _state_name(t["state"]) == "COMPLETE" and t.get("value") is not None
    ]
    pruned = [
        (t["number"], float(t["value"]))
        for t in rows
        if _state_name(t["state"]) == "PRUNED" and t.get("value") is not None
    ]
    others = len(rows) - len(done) - len(pruned)
    if done:
        numbers, values = np.array(done).T
        ax.scatter(numbers, values, color="tab:blue", s=25, label="complete", zorder=3)
        best = np.minimum.accumulate(values)
        ax.step(
            numbers,
            best,
            where="post",
            color="tab:red",
            lw=1.5,
            label=f"best so far ({best[-1]:.1f})",
        )
    if pruned:
        numbers, values = np.array(pruned).T
        ax.scatter(numbers, values, marker="v", color="tab:orange", s=25, label="pruned", zorder=3)
    if not done and not pruned:
        ax.text(
            0.5,
            0.5,
            "no trial has reported a value yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=11,
        )
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
        ax.text(
            0.5,
            0.5,
            note or "parameter importances need at least 2 finished trials",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=11,
            wrap=True,
        )
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


SCHEDULE_COLOURS = {"joint": "tab:blue", "pretrain": "tab:orange"}
OTHER_SCHEDULE_COLOUR = "tab:gray"
BEST_COLOUR, PAPER_COLOUR = "tab:green", "tab:purple"


def learning_curves_figure(
    curves: list,
    out_path,
    baseline: float | None = None,
    metric: str = "val_mpjpe",
    note: str | None = None,
) -> Path:
    """Every trial's validation error per epoch in one plot.

    curves: [{'trial_id': str, 'schedule': 'joint' | 'pretrain' | None, 'state': 'COMPLETE' |
    'PRUNED' | 'ERROR', 'epochs': [int], 'values': [float], 'is_best': bool,
    'is_paper_defaults': bool}], only the epochs that have a value (a pretrain trial's detection
    stage has none); a trial without any is counted in the title.  Colour says the schedule; a
    pruned trial is thin and dashed and ends with an x; the best trial and the paper-defaults trial
    are drawn thick, over the others, and labelled.
    baseline: the mean-pose baseline (mm), a horizontal line; note: a line of text under the plot
    (e.g. that only each trial's best epoch is known)."""
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    drawn = [c for c in curves if len(c.get("values") or [])]
    # highlighted trials last, so that they lie on top
    drawn.sort(key=lambda c: bool(c.get("is_best")) or bool(c.get("is_paper_defaults")))
    all_values = []
    for c in drawn:
        epochs = np.asarray(c["epochs"], dtype=np.float64)
        values = np.asarray(c["values"], dtype=np.float64)
        all_values.extend(values.tolist())
        colour = SCHEDULE_COLOURS.get(c.get("schedule"), OTHER_SCHEDULE_COLOUR)
        state = _state_name(c.get("state", "COMPLETE"))
        highlighted = c.get("is_best") or c.get("is_paper_defaults")
        style = {"PRUNED": ("--", 1.0, 0.75), "ERROR": (":", 1.0, 0.75)}.get(
            state, ("-", 1.5, 0.85)
        )
        ls, lw, alpha = style
        if highlighted:
            lw, alpha = 3.2, 1.0
            edge = BEST_COLOUR if c.get("is_best") else PAPER_COLOUR
            # a wide band in the highlight colour under the schedule-coloured line
            ax.plot(
                epochs,
                values,
                color=edge,
                lw=lw + 8,
                alpha=0.4,
                ls="-",
                solid_capstyle="round",
                marker="o" if len(values) == 1 else None,
                ms=16,
                zorder=4,
            )
        ax.plot(
            epochs,
            values,
            color=colour,
            ls=ls,
            lw=lw,
            alpha=alpha,
            zorder=5 if highlighted else 2,
            marker="o" if len(values) == 1 else None,
            ms=4,
        )
        end = "x" if state in ("PRUNED", "ERROR") else "o"
        ax.plot(
            epochs[-1:],
            values[-1:],
            marker=end,
            color=colour,
            ms=8 if end == "x" else 4,
            mew=2,
            ls="none",
            zorder=6 if highlighted else 3,
        )
        if highlighted:
            what = (
                "best = paper defaults"
                if c.get("is_best") and c.get("is_paper_defaults")
                else "best"
                if c.get("is_best")
                else "paper defaults"
            )
            low = int(np.argmin(values))
            ax.annotate(
                f"{what}: {c['trial_id']} ({values[low]:.1f} mm)",
                xy=(epochs[low], values[low]),
                xytext=(-12, -20 if c.get("is_best") else 16),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=8.5,
                fontweight="bold",
                color=BEST_COLOUR if c.get("is_best") else PAPER_COLOUR,
                bbox={
                    "boxstyle": "round,pad=0.2",
                    "fc": "white",
                    "alpha": 0.9,
                    "ec": BEST_COLOUR if c.get("is_best") else PAPER_COLOUR,
                },
                arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.8},
                zorder=7,
            )
    if baseline is not None:
        ax.axhline(float(baseline), color="0.35", ls="-.", lw=1.2, zorder=1)
        all_values.append(float(baseline))
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no trial reported a validation error per epoch",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=11,
        )
    else:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=SCHEDULE_COLOURS["joint"], lw=2, label="joint"),
            Line2D([], [], color=SCHEDULE_COLOURS["pretrain"], lw=2, label="pretrain"),
            Line2D([], [], color="0.3", lw=1.5, marker="o", ms=4, label="complete"),
            Line2D(
                [],
                [],
                color="0.3",
                lw=1.0,
                ls="--",
                marker="x",
                ms=7,
                mew=2,
                label="pruned (stopped early)",
            ),
            Line2D([], [], color=BEST_COLOUR, lw=9, alpha=0.4, label="best trial"),
        ]
        if any(c.get("is_paper_defaults") for c in drawn):
            handles.append(
                Line2D([], [], color=PAPER_COLOUR, lw=9, alpha=0.4, label="paper defaults")
            )
        if baseline is not None:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="0.35",
                    ls="-.",
                    lw=1.2,
                    label=f"mean-pose baseline ({float(baseline):.1f} mm)",
                )
            )
        ax.legend(handles=handles, fontsize=8, loc="upper right", framealpha=0.9)
        low, high = min(all_values), max(all_values)
        # room under the lowest curve for the best trial's label
        if low > 0 and high / low > 4:  # early epochs far above the rest: keep the end readable
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_ylim(bottom=low / 1.3)
        else:
            ax.set_ylim(bottom=max(low - 0.12 * (high - low or high or 1.0), 0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (mm, lower is better)")
    schedules = [c.get("schedule") for c in drawn]
    pruned = sum(_state_name(c.get("state", "COMPLETE")) == "PRUNED" for c in drawn)
    title = (
        f"validation MPJPE per epoch: {len(drawn)} trials ({schedules.count('joint')} joint, "
        f"{schedules.count('pretrain')} pretrain), {pruned} pruned"
    )
    if len(curves) > len(drawn):
        title += f"; {len(curves) - len(drawn)} without a value not drawn"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="0.3", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    return _save(fig, out_path)
