"""A grid sweep's results on the test split: one row per trial, the trials that differ only in
their seed pooled into mean and standard deviation, and for a per-action grid one row per action
from that action's own network (PAPER.md's table: MPJPE with its standard deviation over the test
frames). Plain numpy; raypose.evaluation.evaluate.evaluate_grid runs the evaluations."""

import statistics

import numpy as np

from raypose.config import Config, flatten
from raypose.model.metrics import per_joint_error

SEED_NAMES = ("seed",)  # grid parameters that repeat a setting rather than change it
ACTION_KEY = "data.actions"
# where a run is and what it is called: not part of the setting a report names
NOT_SETTINGS = ("data.path", "storage.")


def base_settings(configs: list) -> dict:
    """The settings every trial shares and that differ from raypose's defaults, as {dotted key:
    value}, from the trials' checkpoint configs (Config.to_dict() form): what "the base config"
    of a grid was, e.g. the setting a seeds grid retrains. Keys that differ between trials (the
    grid's own parameters, the run names) are left out."""
    flat = [flatten(c) for c in configs]
    defaults = flatten(Config().to_dict())
    return {
        k: v
        for k, v in sorted(flat[0].items())
        if all(f.get(k) == v for f in flat[1:])
        and defaults.get(k) != v
        and not k.startswith(NOT_SETTINGS)
    }


def sample_errors(pred_3d: np.ndarray, gt_3d: np.ndarray) -> np.ndarray:
    """MPJPE of each sample (Protocol #1: root-aligned), mm.  [N, K, 3] x2 -> [N]"""
    return per_joint_error(pred_3d, gt_3d).mean(axis=1)


def trial_row(trial: dict, report: dict, errors: np.ndarray) -> dict:
    """One trial's test result: its params, MPJPE and its standard deviation over the test
    samples, the mean over actions, and the mean-pose baseline beside it."""
    return {
        "trial_id": trial["trial_id"],
        "params": trial["params"],
        "checkpoint": trial["checkpoint"],
        "checkpoint_is": trial.get("checkpoint_is"),
        "test_samples": int(len(errors)),
        "mpjpe": float(errors.mean()),
        "mpjpe_sd": float(errors.std()),
        "mean_over_actions": report["mean_over_actions"]["mpjpe"],
        "mean_pose_baseline": report["mean_pose_baseline"]["mean_over_actions"],
        "per_action": {a: v["mpjpe"] for a, v in report["per_action"].items()},
    }


def pooled_over_seeds(rows: list, seed_names=SEED_NAMES) -> list:
    """Rows whose params differ only in a seed parameter pooled: the mean and the sample standard
    deviation (n - 1) over seeds of each row's mean over actions. A setting run once has sd None."""
    groups: dict = {}
    for row in rows:
        key = tuple(sorted((k, repr(v)) for k, v in row["params"].items() if k not in seed_names))
        groups.setdefault(key, []).append(row)
    pooled = []
    for members in groups.values():
        values = [r["mean_over_actions"] for r in members]
        pooled.append(
            {
                "params": {k: v for k, v in members[0]["params"].items() if k not in seed_names},
                "seeds": [
                    r["params"].get(n) for r in members for n in seed_names if n in r["params"]
                ],
                "runs": len(members),
                "mean": float(statistics.fmean(values)),
                "sd": float(statistics.stdev(values)) if len(values) > 1 else None,
                "mean_pose_baseline": float(
                    statistics.fmean(r["mean_pose_baseline"] for r in members)
                ),
            }
        )
    return pooled


def per_action_rows(rows: list, action_param: str) -> list:
    """One row per action of a per-action grid: that action's own network on that action's test
    samples (MPJPE and its sd over those samples), in the order of the grid."""
    out = []
    for row in rows:
        action = row["params"][action_param]
        action = action[0] if isinstance(action, list) else action
        out.append(
            {
                "action": action,
                "trial_id": row["trial_id"],
                "mpjpe": row["mpjpe"],
                "mpjpe_sd": row["mpjpe_sd"],
                "mean_pose_baseline": row["mean_pose_baseline"],
                "test_samples": row["test_samples"],
            }
        )
    return out


def markdown(summary: dict, paper_value=None) -> str:
    """grid_report.md. paper_value(method_row, action) -> float | None gives the paper's figure
    for an action (Human3.6M test data only; None leaves the paper's columns out)."""
    lines = [
        f"# Grid sweep {summary['experiment']} on the test split",
        "",
        f"Data: {summary['data']} (source {summary['data_source']}). Grid: "
        + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in summary["grid"].items())
        + f". Test split reads recorded for this experiment: {summary['test_reads']}.",
        "",
    ]
    base = summary.get("base_settings")
    if base is not None:
        shown = ", ".join(f"`{k}={v}`" for k, v in base.items()) or "raypose's defaults"
        lines += [f"Base config, where every trial differs from raypose's defaults: {shown}.", ""]
    actions = summary.get("per_action")
    if actions:
        paper = summary.get("paper") or {}
        header = "| action | MPJPE mm (sd) | mean-pose baseline | test samples |"
        rule = "|---|---|---|---|"
        for method in paper:
            header += f" {method} |"
            rule += "---|"
        lines += ["One network per action, each tested on its own action:", "", header, rule]
        for row in actions:
            line = (
                f"| {row['action']} | {row['mpjpe']:.2f} ({row['mpjpe_sd']:.2f}) | "
                f"{row['mean_pose_baseline']:.2f} | {row['test_samples']} |"
            )
            for figures in paper.values():
                value = figures.get(row["action"])
                line += f" {'-' if value is None else f'{value:.2f}'} |"
            lines.append(line)
        mean = statistics.fmean(r["mpjpe"] for r in actions)
        lines += ["", f"Mean over actions: {mean:.2f} mm.", ""]
        if not paper:
            lines += [
                f"The paper's Human3.6M figures are not shown: this test split is not Human3.6M "
                f"(source {summary['data_source']}).",
                "",
            ]
    lines += [
        "| setting | runs | seeds | MPJPE mm, mean over actions (sd over seeds) | mean-pose baseline |",
        "|---|---|---|---|---|",
    ]
    for group in summary["settings"]:
        setting = " ".join(f"{k}={v}" for k, v in group["params"].items()) or "(base config)"
        sd = "-" if group["sd"] is None else f"{group['sd']:.2f}"
        seeds = ", ".join(map(str, group["seeds"])) or "-"
        lines.append(
            f"| {setting} | {group['runs']} | {seeds} | {group['mean']:.2f} ({sd}) | "
            f"{group['mean_pose_baseline']:.2f} |"
        )
    lines += [
        "",
        "| trial | params | checkpoint | MPJPE mm (sd over samples) | mean over actions |",
        "|---|---|---|---|---|",
    ]
    for row in summary["trials"]:
        params = " ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(
            f"| {row['trial_id']} | {params} | {row['checkpoint_is']} | "
            f"{row['mpjpe']:.2f} ({row['mpjpe_sd']:.2f}) | {row['mean_over_actions']:.2f} |"
        )
    return "\n".join(lines) + "\n"
