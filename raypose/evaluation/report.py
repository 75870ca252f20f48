"""The sweep report: what a hyperparameter search found, read from the experiment's best.json.

  raypose report <experiment URI> [--out DIR]

It answers the paper's question (multi-task "joint" training against detection pre-training) at
equal epochs, sets the best trial beside the trial run with the paper's settings and beside the
mean-pose baseline, shows every trial's learning curve and the parameter importances (from the
copy of the Optuna study next to best.json, when there is one), and gives the best settings as
`--set` flags and as YAML.

Outputs (sweep_report.md, sweep_report.json, learning_curves.png, param_importance.png) go to --out
(default runs/sweep-report/<experiment>-<UTC time>[-N]) and to a new folder next to best.json
(<experiment>/sweep-report-<UTC time>[-N]); nothing is overwritten, and sweep_report.json is
uploaded last.  `raypose evaluate <experiment>` puts the same sections into its report.md.

best.json files written before trial rows carried 'state', 'schedule', 'is_paper_defaults' and
'history', and before the file carried 'paper_defaults' and 'val_mean_pose_mpjpe', still give a
report: what can be read off the older keys is, the rest is left out, and the report's notes say
which.
"""

import datetime
import json
import math
import posixpath
import tempfile
from pathlib import Path

import numpy as np
import yaml

from raypose import storage, validate
from raypose.config import Config, ConfigError, resolve_key
from raypose.evaluation import history
from raypose.storage import experiment as files
from raypose.storage.experiment import TRIAL_STATES, trial_state

SCHEDULES = ("joint", "pretrain")
OUTPUT_FILES = (
    "sweep_report.md",
    "sweep_report.json",
    "learning_curves.png",
    "param_importance.png",
)
REQUIRED_KEYS = ("trial_id", "params", "value", "trials")
REQUIRED_TRIAL_KEYS = ("trial_id", "params", "best_val_mpjpe")


class SweepReportError(ValueError):
    """best.json is missing, not JSON, or lacks what the report needs; the message names it."""


# ----------------------------------------------------------------------------------------------
# Reading best.json


def read_best(uri: str) -> tuple:
    """(experiment Location, best.json as a dict), checked with check_best."""
    loc = storage.parse(uri)
    best_loc = loc.join("best.json")
    try:
        present = storage.exists(best_loc)
    except Exception as e:  # botocore raises many kinds for an endpoint that is down
        raise storage.StorageError(f"{loc.uri} is unreachable: {type(e).__name__}") from None
    if not present:
        # raypose.storage.experiment.resolve says what the URI is instead: missing, an unfinished sweep, a training run
        target = files.resolve(uri)
        if target["kind"] == "grid":
            raise SweepReportError(
                f"{loc.uri} is a grid sweep (grid.json), which chooses no best trial; "
                f"`raypose evaluate {loc.uri}` reports every trial"
            )
        raise SweepReportError(
            f"{loc.uri} is a {target['kind']}, not an experiment (no best.json); "
            "pass the sweep's folder, the one holding best.json"
        )
    try:
        best = files.read_best_json(best_loc)
    except files.EvaluationError as e:
        raise SweepReportError(str(e)) from None
    check_best(best, best_loc.uri)
    return loc, best


def check_best(best, where: str) -> None:
    """The keys the report cannot do without; a SweepReportError naming the first one missing."""
    if not isinstance(best, dict):
        raise SweepReportError(f"{where}: expected a JSON object, got {type(best).__name__}")
    for key in REQUIRED_KEYS:
        if key not in best:
            raise SweepReportError(
                f"{where} has no {key!r} key; it is not a raypose best.json "
                f"(expected keys {', '.join(REQUIRED_KEYS)} ...)"
            )
    if not isinstance(best["trials"], list) or not best["trials"]:
        raise SweepReportError(f"{where}: 'trials' must be a non-empty list of trial rows")
    for i, row in enumerate(best["trials"]):
        if not isinstance(row, dict):
            raise SweepReportError(
                f"{where}: trials[{i}] must be an object, got {type(row).__name__}"
            )
        for key in REQUIRED_TRIAL_KEYS:
            if key not in row:
                raise SweepReportError(f"{where}: trials[{i}] has no {key!r} key")
        for j, point in enumerate(row.get("history") or []):
            if not isinstance(point, dict) or "epoch" not in point:
                raise SweepReportError(f"{where}: trials[{i}].history[{j}] has no 'epoch'")


# ----------------------------------------------------------------------------------------------
# The numbers (plain Python on the best.json dict)


def _finite(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _schedule_of(row: dict, base_config: dict):
    if row.get("schedule") in SCHEDULES:
        return row["schedule"]
    params = row.get("params") or {}
    for key in ("schedule", "schedule.kind"):
        if params.get(key) in SCHEDULES:
            return params[key]
    kind = ((base_config or {}).get("schedule") or {}).get("kind")
    return kind if kind in SCHEDULES else None


def trial_rows(best: dict, notes: list) -> list:
    """One row per trial: state, schedule, whether it is the best or the paper-defaults trial, and
    its curve (the [epoch, val_mpjpe] points that have a regression head).  Appends to notes what
    had to be read off older keys."""
    rows_in = best["trials"]
    paper = best.get("paper_defaults")
    paper_id = paper.get("trial_id") if isinstance(paper, dict) else None
    missing = {
        key: sum(key not in r for r in rows_in)
        for key in ("state", "schedule", "is_paper_defaults", "history")
    }
    rows = []
    for row in rows_in:
        params = row.get("params") or {}
        history = row.get("history")
        if history is None:  # an older best.json: only the best epoch is known
            value, epoch = _finite(row.get("best_val_mpjpe")), row.get("best_epoch")
            curve = [[int(epoch), value]] if value is not None and epoch is not None else []
        else:
            curve = [
                [int(h["epoch"]), _finite(h.get("val_mpjpe"))]
                for h in history
                if h.get("has_regression_head", True) and _finite(h.get("val_mpjpe")) is not None
            ]
            curve.sort()
        if "is_paper_defaults" in row:
            is_paper = bool(row["is_paper_defaults"])
        else:
            is_paper = paper_id is not None and str(row["trial_id"]) == str(paper_id)
        rows.append(
            {
                "trial_id": str(row["trial_id"]),
                "state": trial_state(row),
                "schedule": _schedule_of(row, best.get("config")),
                "is_best": str(row["trial_id"]) == str(best["trial_id"]),
                "is_paper_defaults": is_paper,
                "epochs": row.get("epochs"),
                "best_val_mpjpe": _finite(row.get("best_val_mpjpe")),
                "best_epoch": row.get("best_epoch"),
                "params": params,
                "error": row.get("error"),
                "history_available": history is not None,
                "curve": curve,
            }
        )
    if missing["state"]:
        notes.append(
            f"{missing['state']} trial row(s) carry no 'state' (an older best.json): "
            "ERROR where the row names an error, PRUNED where it stopped early, else COMPLETE"
        )
    if missing["schedule"]:
        unknown = sum(r["schedule"] is None for r in rows)
        left_out = (
            f"; {unknown} trial(s) have none and are left out of the comparison" if unknown else ""
        )
        notes.append(
            f"{missing['schedule']} trial row(s) carry no 'schedule': read from the trial's "
            f"params, else from the sweep's base config{left_out}"
        )
    if missing["history"]:
        notes.append(
            f"{missing['history']} trial row(s) carry no per-epoch 'history' (an older "
            "best.json): their learning curve is the single point of their best epoch, "
            "and they are left out of the comparison at equal epochs"
        )
    return rows


def _stats(values: list) -> dict | None:
    if not values:
        return None
    return {"best": float(min(values)), "median": float(np.median(values)), "count": len(values)}


def equal_epochs(rows: list) -> dict:
    """joint against pretrain at each epoch: among the trials (complete or pruned) that reported a
    val_mpjpe at that epoch, the best and the median per schedule, and the verdict at the largest
    epoch that both schedules reached."""
    by_epoch = {}
    for r in rows:
        if r["schedule"] not in SCHEDULES or not r["history_available"]:
            continue
        for epoch, value in r["curve"]:
            by_epoch.setdefault(epoch, {s: [] for s in SCHEDULES})[r["schedule"]].append(value)
    table = [
        {"epoch": e, **{s: _stats(by_epoch[e][s]) for s in SCHEDULES}} for e in sorted(by_epoch)
    ]
    shared = [t for t in table if t["joint"] and t["pretrain"]]
    result = {
        "rows": table,
        "epoch": None,
        "winner": None,
        "margin_mm": None,
        "margin_percent": None,
    }
    if not shared:
        reached = {s: sum(1 for t in table if t[s]) for s in SCHEDULES}
        if not table:
            why = "no trial row has a per-epoch history"
        else:
            why = (
                f"no epoch has a val MPJPE from both schedules (joint at {reached['joint']} "
                f"epoch(s), pretrain at {reached['pretrain']})"
            )
        result["answer"] = f"joint and pretrain cannot be compared at equal epochs: {why}."
        return result
    last = shared[-1]
    joint, pretrain = last["joint"], last["pretrain"]
    result["epoch"] = last["epoch"]
    if joint["best"] == pretrain["best"]:
        result.update(winner="tie", margin_mm=0.0, margin_percent=0.0)
        result["answer"] = (
            f"At epoch {last['epoch']}, the largest epoch both schedules reached, "
            f"joint and pretrain tie at {joint['best']:.1f} mm (best of "
            f"{joint['count']} and {pretrain['count']} trials)."
        )
        return result
    winner, loser = (
        ("joint", "pretrain") if joint["best"] < pretrain["best"] else ("pretrain", "joint")
    )
    won, lost = last[winner], last[loser]
    margin = lost["best"] - won["best"]
    result.update(winner=winner, margin_mm=margin, margin_percent=100.0 * margin / lost["best"])
    result["answer"] = (
        f"At epoch {last['epoch']}, the largest epoch both schedules reached, {winner} won: its "
        f"best trial reached {won['best']:.1f} mm against {lost['best']:.1f} mm for {loser}, "
        f"{margin:.1f} mm ({result['margin_percent']:.1f} %) lower (medians {won['median']:.1f} vs "
        f"{lost['median']:.1f} mm; {won['count']} {winner} and {lost['count']} {loser} trial(s) at that epoch)."
    )
    return result


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def best_vs_paper(best: dict, rows: list, baseline: float | None, notes: list) -> dict:
    """The best trial and the paper-defaults trial side by side, and their ratios."""
    best_row = next((r for r in rows if r["is_best"]), None)
    best_entry = {
        "trial_id": str(best["trial_id"]),
        "params": best["params"],
        "value": _finite(best["value"]),
        "epoch": best.get("epoch"),
        "schedule": best_row["schedule"] if best_row else None,
    }
    paper_row = next((r for r in rows if r["is_paper_defaults"]), None)
    paper = best.get("paper_defaults")
    paper_entry = None
    if isinstance(paper, dict) or paper_row is not None:
        paper = paper if isinstance(paper, dict) else {}
        value = _finite(paper.get("value"))
        if value is None and paper_row is not None:
            value = paper_row["best_val_mpjpe"]
        paper_entry = {
            "trial_id": str(paper.get("trial_id") or paper_row["trial_id"]),
            "params": paper.get("params") or (paper_row or {}).get("params") or {},
            "value": value,
            "state": paper_row["state"] if paper_row else None,
        }
        if value is None:
            notes.append(
                f"the paper-defaults trial {paper_entry['trial_id']} reported no val MPJPE"
                + (f" (state {paper_row['state']})" if paper_row else "")
                + "; no ratio to it"
            )
    elif "paper_defaults" in best:
        notes.append("this sweep ran no trial with the paper's settings (paper_defaults is null)")
    else:
        notes.append(
            "best.json has no 'paper_defaults' (an older sweep): no paper-defaults trial "
            "to compare with"
        )
    return {
        "best": best_entry,
        "paper_defaults": paper_entry,
        "ratio_best_to_paper": _ratio(best_entry["value"], paper_entry and paper_entry["value"]),
        "ratio_best_to_baseline": _ratio(best_entry["value"], baseline),
        "ratio_paper_to_baseline": _ratio(paper_entry and paper_entry["value"], baseline),
    }


def _plain(value):
    """Numbers short enough to read, exact enough to reuse (6 significant digits)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def settings(params: dict) -> dict:
    """The best trial's params as `--set` flags and as a YAML config snippet (nested by the config
    keys they name; raypose train --config takes it)."""
    flags = []
    nested = {}
    cfg = Config()
    for name, value in params.items():
        value = _plain(value)
        if isinstance(value, bool):
            text = str(value).lower()  # YAML's spelling, which --set parses
        elif isinstance(value, float):
            text = f"{value:.6g}"
        else:
            text = str(value)
        flags.append(f"--set {name}={text}")
        try:
            path = resolve_key(cfg, name, "best params")
        except ConfigError:
            path = name
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {
        "set_flags": " ".join(flags),
        "yaml": yaml.safe_dump(nested, default_flow_style=False, sort_keys=True),
    }


def summarise(
    best: dict,
    experiment_uri: str,
    importances: dict | None = None,
    importance_note: str | None = None,
) -> dict:
    """Everything sweep_report.json holds, from best.json (checked by check_best) and the
    parameter importances when they could be computed."""
    notes = []
    rows = trial_rows(best, notes)
    baseline = _finite(best.get("val_mean_pose_mpjpe"))
    if baseline is None:
        notes.append(
            "best.json has no 'val_mean_pose_mpjpe' (an older sweep): no ratio to the "
            "mean-pose baseline and no baseline line in learning_curves.png"
        )
    counts = {s: sum(r["state"] == s for r in rows) for s in TRIAL_STATES}
    return {
        "experiment": best.get("experiment") or experiment_uri,
        "metric": best.get("metric", "val_mpjpe"),
        "mode": best.get("mode", "min"),
        "val_mean_pose_mpjpe": baseline,
        "counts": {
            "trials": len(rows),
            **counts,
            **{s: sum(r["schedule"] == s for r in rows) for s in SCHEDULES},
        },
        "equal_epochs": equal_epochs(rows),
        "best_vs_paper": best_vs_paper(best, rows, baseline, notes),
        "importances": dict(importances or {}),
        "importance_note": None if importances else importance_note,
        "settings": settings(best["params"]),
        "trials": rows,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------
# Markdown


def _mm(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_value_text(v)}" for k, v in params.items()) or "-"


def markdown_section(summary: dict, level: int = 2) -> str:
    """The sweep's sections as Markdown, headings at `level` (2 in sweep_report.md, 3 inside
    evaluate's report.md)."""
    h = "#" * level
    c = summary["counts"]
    lines = [
        f"Experiment `{summary['experiment']}`: {c['trials']} trials ({c['joint']} joint, "
        f"{c['pretrain']} pretrain): {c['COMPLETE']} complete, {c['PRUNED']} pruned, "
        f"{c['ERROR']} error.  Metric: {summary['metric']}, validation MPJPE in mm, lower is better.",
        f"Validation mean-pose baseline: {_mm(summary['val_mean_pose_mpjpe'])} mm.",
        *(
            [f"Test split reads recorded for this experiment: {summary['test_reads']}."]
            if "test_reads" in summary
            else []
        ),
        "",
    ]
    if "learning_curves.png" in (summary.get("figures") or []):
        lines += ["![learning curves](learning_curves.png)", ""]

    eq = summary["equal_epochs"]
    lines += [f"{h} Joint vs pretrain at equal epochs", "", eq["answer"], ""]
    if eq["rows"]:
        lines += [
            "| epoch | joint best | joint median | joint trials | pretrain best | "
            "pretrain median | pretrain trials |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in eq["rows"]:
            cells = []
            for s in SCHEDULES:
                st = row[s]
                cells += (
                    ["-", "-", "0"]
                    if st is None
                    else [_mm(st["best"]), _mm(st["median"]), str(st["count"])]
                )
            lines.append(f"| {row['epoch']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Each epoch counts the trials that reported a val MPJPE at it (pruned ones "
            "included; a pretrain trial reports none during its detection stage).",
            "",
        ]

    bp = summary["best_vs_paper"]
    b, p = bp["best"], bp["paper_defaults"]
    lines += [
        f"{h} Best trial vs paper defaults",
        "",
        "| | trial | schedule | best val MPJPE (mm) | / mean-pose baseline |",
        "|---|---|---|---|---|",
        f"| best | {b['trial_id']} | {b['schedule'] or '-'} | {_mm(b['value'])} | "
        f"{_x(bp['ratio_best_to_baseline'])} |",
    ]
    if p is not None:
        paper_schedule = next(
            (r["schedule"] for r in summary["trials"] if r["is_paper_defaults"]), None
        )
        lines.append(
            f"| paper defaults | {p['trial_id']} | {paper_schedule or '-'} | {_mm(p['value'])} | "
            f"{_x(bp['ratio_paper_to_baseline'])} |"
        )
        lines += [
            "",
            f"best / paper defaults: {_x(bp['ratio_best_to_paper'])}",
            "",
            "| param | best | paper defaults |",
            "|---|---|---|",
        ]
        for key in dict.fromkeys([*b["params"], *p["params"]]):
            lines.append(
                f"| {key} | {_value_text(b['params'].get(key, '-'))} | "
                f"{_value_text(p['params'].get(key, '-'))} |"
            )
    else:
        lines += ["", "No paper-defaults trial in this sweep.", "", "| param | best |", "|---|---|"]
        for key, value in b["params"].items():
            lines.append(f"| {key} | {_value_text(value)} |")
    lines.append("")

    lines += [f"{h} Parameter importances", ""]
    if summary["importances"]:
        lines += ["| param | importance |", "|---|---|"]
        for key, value in sorted(summary["importances"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {key} | {value:.3f} |")
    else:
        lines.append(f"Not computed: {summary['importance_note'] or 'no importances'}.")
    if "param_importance.png" in (summary.get("figures") or []):
        lines += ["", "![parameter importance](param_importance.png)"]
    lines.append("")

    st = summary["settings"]
    lines += [
        f"{h} Settings to use",
        "",
        "The best trial's parameters, on top of the sweep's base config (best.json's 'config' "
        "holds the full one):",
        "",
        "```bash",
        f"raypose train {st['set_flags']}",
        "```",
        "",
        "or in a `--config` YAML file:",
        "",
        "```yaml",
        st["yaml"].rstrip(),
        "```",
        "",
    ]

    lines += [
        f"{h} Trials",
        "",
        "| trial | state | schedule | epochs run | best val MPJPE (mm) | best epoch | params |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        summary["trials"], key=lambda r: (r["best_val_mpjpe"] is None, r["best_val_mpjpe"] or 0)
    )
    for r in order:
        tags = [
            t
            for t, on in (("best", r["is_best"]), ("paper defaults", r["is_paper_defaults"]))
            if on
        ]
        name = r["trial_id"] + (f" ({', '.join(tags)})" if tags else "")
        state = r["state"] + (f": {r['error']}" if r["error"] else "")
        epochs, best_epoch = ("-" if v is None else v for v in (r["epochs"], r["best_epoch"]))
        lines.append(
            f"| {name} | {state} | {r['schedule'] or '-'} | {epochs} | {_mm(r['best_val_mpjpe'])} | "
            f"{best_epoch} | {_params_text(r['params'])} |"
        )
    lines.append("")
    if summary["notes"]:
        lines += [f"{h} Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def markdown_report(summary: dict) -> str:
    lines = ["# raypose sweep report", "", markdown_section(summary, level=2)]
    if summary.get("outputs"):
        lines += [f"Outputs: {summary['outputs']['local']} and {summary['outputs']['storage']}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures and the job


def write_learning_curves(out: Path, summary: dict) -> list:
    """learning_curves.png when some trial has a point to draw; returns the file names written."""
    from raypose.evaluation.figures import learning_curves_figure

    curves = [
        {
            "trial_id": r["trial_id"],
            "schedule": r["schedule"],
            "state": r["state"],
            "epochs": [e for e, _ in r["curve"]],
            "values": [v for _, v in r["curve"]],
            "is_best": r["is_best"],
            "is_paper_defaults": r["is_paper_defaults"],
        }
        for r in summary["trials"]
    ]
    if not any(r["curve"] for r in summary["trials"]):
        return []
    without_history = sum(not r["history_available"] for r in summary["trials"])
    note = (
        f"{without_history} trial(s) without a per-epoch history in best.json (an older sweep): "
        "drawn at their best epoch only"
        if without_history
        else None
    )
    learning_curves_figure(
        curves,
        out / "learning_curves.png",
        baseline=summary["val_mean_pose_mpjpe"],
        metric=summary["metric"],
        note=note,
    )
    return ["learning_curves.png"]


def sweep_report(uri: str, out_dir: str | None = None, force: bool = False) -> dict:
    # the command's own input first: --out's kind, an earlier report there, storage answering
    if out_dir is not None:
        checked = validate.output_dir(out_dir, "--out")
        clash = [n for n in OUTPUT_FILES if (checked / n).exists()]
        if clash and not force:  # an earlier report is never overwritten silently
            raise SweepReportError(
                f"{checked / clash[0]} already exists: --out {checked} holds an "
                "earlier report; pass another --out, or --force to replace it "
                "(nothing was written)"
            )
    if storage.parse(uri).scheme == "s3":
        storage.check_reachable(storage.parse(uri), create=False)
    experiment, best = read_best(uri)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = f"sweep-report-{stamp}"
    name = posixpath.basename(experiment.path.rstrip("/")) or "experiment"
    out = (
        Path(out_dir)
        if out_dir
        else files.free_local_dir(Path("runs") / "sweep-report" / f"{name}-{stamp}")
    )
    with tempfile.TemporaryDirectory() as tmp:
        study_db = files.fetch_study_copy(experiment, Path(tmp))
        sweep = history.sweep_history(best, study_db, files.study_copy(experiment))
    summary = summarise(best, experiment.uri, sweep["importances"], sweep["note"])
    # how often the test split has been read for this experiment (its ledger), so a reader of the
    # validation figures knows whether test figures were seen while choosing
    summary["test_reads"] = len(files.read_ledger(experiment.join(files.LEDGER_FILE)))
    from raypose.evaluation.figures import param_importance_figure

    # written beside --out and renamed into it at the end: a failure leaves --out as it was
    with validate.staged_folder(out, OUTPUT_FILES) as stage:
        figures = write_learning_curves(stage, summary)
        param_importance_figure(
            sweep["importances"],
            stage / "param_importance.png",
            note=None if sweep["importances"] else sweep["note"],
        )
        summary["figures"] = figures + ["param_importance.png"]
        remote = files.free_storage_dir(experiment, folder)
        summary["outputs"] = {"local": str(out.resolve()), "storage": remote.uri}
        (stage / "sweep_report.md").write_text(markdown_report(summary))
        (stage / "sweep_report.json").write_text(json.dumps(summary, indent=1))
    files.upload_outputs(out, [*summary["figures"], "sweep_report.md", "sweep_report.json"], remote)
    print(f"[raypose] {summary['equal_epochs']['answer']}", flush=True)
    bp = summary["best_vs_paper"]
    print(
        f"[raypose] best trial {bp['best']['trial_id']}: {_mm(bp['best']['value'])} mm; "
        f"best / paper defaults {_x(bp['ratio_best_to_paper'])}, best / mean-pose baseline "
        f"{_x(bp['ratio_best_to_baseline'])}",
        flush=True,
    )
    print(
        f"[raypose] the test split has been read {summary['test_reads']} time(s) for this "
        "experiment",
        flush=True,
    )
    print(
        f"[raypose] sweep report: {out.resolve() / 'sweep_report.md'} and {remote.uri}", flush=True
    )
    return summary


# ----------------------------------------------------------------------------------------------
# Command line: raypose report / jobs/report.py


def add_arguments(parser) -> None:
    parser.add_argument("uri", help="experiment URI: the sweep's folder holding best.json")
    parser.add_argument(
        "--out", help="local output folder (default: runs/sweep-report/<experiment>-<time>)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the report in --out if it holds one (default: refuse)",
    )


def run(args) -> int:
    # raypose's errors reach raypose.cli.main, which prints them as one line and exits 2
    sweep_report(args.uri, args.out, args.force)
    return 0
