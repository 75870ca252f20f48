"""The evaluation job: pull the best (or a named) checkpoint from storage, run the test split and
write the numbers and pictures that decide what to ship.

  raypose evaluate <experiment URI | checkpoint URI> [--data DIR] [--out DIR] [--gpu]

An experiment URI holds best.json (written at the end of a sweep); a checkpoint URI holds
manifest.json.  The model is rebuilt from the checkpoint's own config, after every file of the
checkpoint has been checked against its manifest; weights load with weights_only=True.  Outputs
(report.json, report.md, predictions.npz and PNG figures) go to --out (default
runs/evaluation/<folder>) and to a new folder next to the checkpoint in storage
(<run>/evaluation-<checkpoint>-<UTC time>[-N]); nothing is overwritten: an --out that already
holds a report is refused, and a storage folder that exists gets the next free -N suffix.
report.json is uploaded last, so a storage folder with a report.json is complete.

For an experiment, the sweep's history and parameter importances are drawn from the copy of the
Optuna study next to best.json (<experiment>/optuna.db).  Without that copy the history is drawn
from the trial rows in best.json and the importance figure carries a note instead of bars; when
best.json has no trial rows either, sweep_history.png is left out.  report.json's "sweep" entry
says which source was used and why.
"""

import datetime
import hashlib
import json
import posixpath
import tempfile
from pathlib import Path

import numpy as np
import torch

from raypose import storage, validate
from raypose.config import Config, ConfigError, config_from_checkpoint, resolve_key
from raypose.data import cache as datacache
from raypose.data.dataset import PoseDataset, centre_crop
from raypose.data.h36m import selection_attrs
from raypose.data.skeleton import H36M_SKELETON
from raypose.evaluation import grid as grid_results
from raypose.evaluation.history import sweep_history
from raypose.model.baselines import image_baselines
from raypose.model.metrics import body_size, grouped_report, mean_pose_baseline
from raypose.storage import checkpoint
from raypose.storage.experiment import (
    EvaluationError,
    fetch_study_copy,
    free_local_dir,
    free_storage_dir,
    ledger_location,
    read_grid,
    record_test_read,
    resolve,
    study_copy,
    upload_outputs,
)
from raypose.train.loop import build_model, predict

# PAPER.md's results table (MPJPE mm, Human3.6M), printed beside ours for orientation
PAPER_RESULTS = {
    "DconvMP-HML (multi-task, paper)": {
        "Walking": 77.60,
        "Discussion": 148.79,
        "Eating": 104.01,
        "Taking Photo": 189.08,
        "Walking Dog": 146.59,
        "Greeting": 127.17,
    },
    "DconvMP (detection-pretrained, paper)": {
        "Walking": 80.09,
        "Eating": 103.31,
        "Taking Photo": 190.37,
    },
}


# Human3.6M's action names come in several spellings: "Taking Photo" (the paper), "TakingPhoto"
# (the directory names raypose.data.h36m reads), "Photo" / "WalkDog" (the original video files)
ACTION_ALIASES = {"photo": "takingphoto", "walkdog": "walkingdog"}


def action_key(name: str) -> str:
    """The spelling-independent key of an action name: 'Taking Photo', 'TakingPhoto', 'taking_photo'
    and 'Photo' all give 'takingphoto'."""
    key = "".join(c for c in str(name).lower() if c.isalnum())
    return ACTION_ALIASES.get(key, key)


def paper_value(row: dict, action: str):
    """The paper's number for one of our actions, whatever the spelling; None where it has none."""
    by_key = {action_key(a): v for a, v in row.items()}
    return by_key.get(action_key(action))


# every file an evaluation writes; an --out holding any of them is refused
OUTPUT_FILES = (
    "report.json",
    "report.md",
    "predictions.npz",
    "skeletons.png",
    "joint_errors.png",
    "sweep_history.png",
    "param_importance.png",
    "learning_curves.png",
)


STAGES = ("joint", "regression", "detection")
# the image baselines of raypose.model.baselines: report key, name in the report
IMAGE_BASELINES = (
    ("nearest_neighbour_baseline", "nearest-neighbour baseline"),
    ("ridge_baseline", "ridge baseline"),
)


def check_state(local_ckpt: Path, state: dict) -> dict:
    """The keys of state.json that an evaluation reads, of the right types; returns the heads
    (absent in older checkpoints: both). CheckpointError naming the file otherwise."""
    where = f"checkpoint {local_ckpt}: {checkpoint.STATE_FILE}"
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise checkpoint.CheckpointError(
            f"{where}: 'epoch' must be a whole number >= 0, got {validate.shown(epoch)}"
        )
    if state.get("stage") not in STAGES:
        raise checkpoint.CheckpointError(
            f"{where}: 'stage' must be one of {', '.join(STAGES)}, got "
            f"{validate.shown(state.get('stage'))}"
        )
    heads = state.get("heads", {"regression": True, "detection": True})
    if not (
        isinstance(heads, dict)
        and all(isinstance(heads.get(h), bool) for h in ("regression", "detection"))
    ):
        raise checkpoint.CheckpointError(
            f"{where}: 'heads' must be an object with 'regression' and "
            f"'detection' true or false, got {validate.shown(heads)}"
        )
    if not (heads["regression"] or heads["detection"]):
        raise checkpoint.CheckpointError(f"{where}: 'heads' names no head")
    return heads


def load_model(local_ckpt: Path, device: torch.device):
    """Verify the manifest, check config.json (every Config check, the machine's memory
    included) and state.json, and only then load the weights (weights_only=True) into the model
    rebuilt from the checkpoint's own config."""
    loaded = checkpoint.load_metadata(local_ckpt)  # verifies sha256 of every file
    try:
        cfg = config_from_checkpoint(
            loaded["config"], f"checkpoint {local_ckpt}: {checkpoint.CONFIG_FILE}"
        )
    except ConfigError as e:  # a fault of the checkpoint: named as such, with its file and key
        raise checkpoint.CheckpointError(str(e)) from None
    heads = check_state(local_ckpt, loaded["state"])
    stage = (
        "joint"
        if heads["regression"] and heads["detection"]
        else ("regression" if heads["regression"] else "detection")
    )
    loaded.update(checkpoint.load_weights(local_ckpt))  # nothing is unpickled before the checks
    model = build_model(cfg, stage)
    try:
        model.load_state_dict(loaded["model"])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(
            f"checkpoint {local_ckpt}: weights do not fit the model of its config ({e})"
        ) from None
    return model.to(device).eval(), cfg, loaded


def detection_scores(logits: np.ndarray, targets: np.ndarray) -> dict:
    """Cell accuracy over all (joint, window) indicators, and the share of joints whose most
    confident window is one that truly contains the joint.  logits, targets: [N, 17, 100]."""
    cell = float(((logits > 0) == (targets > 0.5)).mean())
    top = logits.argmax(axis=-1)  # [N, 17]
    hit = np.take_along_axis(targets, top[..., None], axis=-1)[..., 0] > 0.5
    has_window = targets.max(axis=-1) > 0.5
    return {
        "cell_accuracy": cell,
        "top_window_accuracy": float(hit[has_window].mean()) if has_window.any() else None,
    }


def check_inputs(
    uri: str,
    data_dir: str | None,
    out_dir: str | None,
    use_gpu: bool,
    batch_size: int,
    force: bool = False,
) -> None:
    """Every check on the command's own input that needs no checkpoint, run before any download:
    the flags, the kinds of the paths, an earlier report in --out, and that storage answers."""
    validate.positive(batch_size, "--batch-size")
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu was given but no CUDA device is visible; drop --gpu")
    if data_dir is not None:
        storage.data_location(data_dir, "--data")
    if out_dir is not None:
        out = validate.output_dir(out_dir, "--out")
        clash = [n for n in OUTPUT_FILES if (out / n).exists()]
        if clash and not force:  # an earlier evaluation's outputs are never overwritten silently
            raise EvaluationError(
                f"{out / clash[0]} already exists: --out {out} holds an earlier "
                "evaluation; pass another --out, or --force to replace it "
                "(nothing was written)"
            )
    loc = storage.parse(uri)
    if loc.scheme == "s3":
        storage.check_reachable(loc, create=False)


def evaluate(
    uri: str,
    data_dir: str | None = None,
    out_dir: str | None = None,
    use_gpu: bool = False,
    batch_size: int = 64,
    force: bool = False,
    local_label: str | None = None,
    experiment: storage.Location | None = None,
    memo: dict | None = None,
) -> dict:
    """local_label: what report.json names as the local output folder (default: --out's path;
    an evaluation run as a Ray task names the caller's folder, not the node's temporary one).
    experiment: the experiment whose test-split ledger records this read (default: the URI's own
    experiment, or a checkpoint's run folder). A grid sweep's experiment evaluates every trial
    (evaluate_grid). memo: a dict that evaluations of the same data share (evaluate_grid's), so
    that the test file's sha256 and the image baselines of the same samples are computed once."""
    memo = {} if memo is None else memo
    check_inputs(uri, data_dir, out_dir, use_gpu, batch_size, force)
    target = resolve(uri)
    if target["kind"] == "grid":
        return evaluate_grid(target["experiment"], data_dir, out_dir, use_gpu, batch_size, force)
    ckpt_loc = target["checkpoint"]
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError(
            "--gpu was given but no CUDA device is visible here; on a cluster, "
            "submit with `ray job submit --entrypoint-num-gpus 1` (the driver runs "
            "on the head, which often has no GPU), or drop --gpu"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = f"evaluation-{posixpath.basename(ckpt_loc.path)}-{stamp}"
    out = Path(out_dir) if out_dir else free_local_dir(Path("runs") / "evaluation" / folder)
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(ckpt_loc, Path(tmp) / "checkpoint")
        try:
            model, cfg, loaded = load_model(local, device)
        except checkpoint.CheckpointError as e:  # name the checkpoint in storage, not the temp copy
            raise checkpoint.CheckpointError(str(e).replace(str(local), ckpt_loc.uri)) from None
        if not loaded["state"].get("heads", {}).get("regression", True):
            raise checkpoint.CheckpointError(
                f"checkpoint {ckpt_loc.uri} has no regression head (a detection-stage checkpoint); "
                "evaluate a checkpoint from the regression stage"
            )
        # a local folder, or for s3://... this machine's verified copy (raypose.data.cache)
        data_dir = datacache.local_data_dir(data_dir or cfg.data.path)
        # a network trained on some actions (a per-action sweep's trial) is tested on those
        actions = cfg.data.actions or None
        test = PoseDataset(str(Path(data_dir) / "test.h5"), augment=False, actions=actions)
        train = PoseDataset(
            str(Path(data_dir) / "train.h5"),
            split="train",
            val_subjects=cfg.data.val_subjects,
            val_sequence_every=cfg.data.val_sequence_every,
            actions=actions,
        )
        study_db = (
            fetch_study_copy(target["experiment"], Path(tmp)) if target["experiment"] else None
        )
        print(f"[raypose] evaluating {ckpt_loc.uri} on {len(test)} test samples", flush=True)
        with torch.no_grad():
            pred = predict(model, test, batch_size, device)
        # the test split has been read: the ledger says so, whatever happens next
        ledger = ledger_location(ckpt_loc, experiment or target["experiment"])
        reads = record_test_read(
            ledger,
            {
                "checkpoint": ckpt_loc.uri,
                "data": str(Path(data_dir) / "test.h5"),
                "test_sha256": remembered(
                    memo,
                    ("sha256", str(Path(data_dir) / "test.h5")),
                    lambda: storage.sha256_file(Path(data_dir) / "test.h5"),
                ),
                "test_samples": len(test),
                "actions": cfg.data.actions or "all",
            },
        )
        actions = np.array(test.action_names)[pred["actions"]]
        report = build_report(pred, actions, test, train, loaded, ckpt_loc, target, memo)
        report["test_reads"] = {"count": reads, "ledger": ledger.uri}
        subjects = np.array(test.subjects)[test.sample_subjects[pred["positions"]]]
        report["per_subject"] = per_subject(
            pred["pred_3d"], pred["gt_3d"], subjects, train.root_relative_poses()
        )
        # written into a folder beside --out and renamed into it file by file at the end, so a
        # failed evaluation leaves --out as it was and --force never mixes two reports
        with validate.staged_folder(out, OUTPUT_FILES) as stage:
            np.savez_compressed(
                stage / "predictions.npz",
                pred_3d=pred["pred_3d"],
                gt_3d=pred["gt_3d"],
                actions=actions,
                positions=pred["positions"],
            )
            report["figures"] = write_figures(stage, test, pred, report, study_db, target)
            # the storage folder is chosen just before the upload, so that a folder made meanwhile
            # by another evaluation of the same checkpoint is not written into
            parent = storage.Location(ckpt_loc.scheme, posixpath.dirname(ckpt_loc.path))
            remote = free_storage_dir(parent, folder)
            report["outputs"] = {"local": local_label or str(out.resolve()), "storage": remote.uri}
            (stage / "report.md").write_text(markdown_report(report))
            (stage / "report.json").write_text(json.dumps(report, indent=1))
    upload_outputs(out, ["predictions.npz", *report["figures"], "report.md", "report.json"], remote)
    print_result(report, out)
    return report


GRID_OUTPUT_FILES = ("grid_report.md", "grid_report.json")


def evaluate_grid(
    exp: storage.Location,
    data_dir: str | None,
    out_dir: str | None,
    use_gpu: bool,
    batch_size: int,
    force: bool,
) -> dict:
    """Every trial of a grid sweep on the test split (each into --out/<trial id>/, each read in
    the experiment's ledger), then grid_report.md/.json: per trial, pooled over seeds, and for a
    per-action grid one row per action from its own network, beside the paper's figures when the
    data is Human3.6M."""
    record = read_grid(exp)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = f"evaluation-grid-{stamp}"
    out = Path(out_dir) if out_dir else free_local_dir(Path("runs") / "evaluation" / folder)
    clash = [n for n in GRID_OUTPUT_FILES if (out / n).exists()]
    if clash and not force:
        raise EvaluationError(
            f"{out / clash[0]} already exists: --out {out} holds an earlier evaluation; pass "
            "another --out, or --force to replace it (nothing was written)"
        )
    trials = [t for t in record["trials"] if t.get("checkpoint")]
    skipped = [t["trial_id"] for t in record["trials"] if not t.get("checkpoint")]
    if not trials:
        raise EvaluationError(f"{exp.join('grid.json').uri} names no trial with a checkpoint")
    print(
        f"[raypose] grid sweep {exp.uri}: evaluating {len(trials)} trial(s) on the test split"
        + (f" (without a checkpoint, left out: {', '.join(skipped)})" if skipped else ""),
        flush=True,
    )
    rows, configs, source, data = [], [], None, None
    memo = {}  # a seeds grid's trials share the test file and the baselines' training samples
    for i, trial in enumerate(trials, 1):
        shown = " ".join(f"{k}={v}" for k, v in trial["params"].items())
        print(f"[raypose] grid trial {i}/{len(trials)} {trial['trial_id']}: {shown}", flush=True)
        trial_out = out / str(trial["trial_id"])
        report = evaluate(
            trial["checkpoint"],
            data_dir,
            str(trial_out),
            use_gpu,
            batch_size,
            force,
            experiment=exp,
            memo=memo,
        )
        with np.load(trial_out / "predictions.npz") as npz:
            errors = grid_results.sample_errors(npz["pred_3d"], npz["gt_3d"])
        rows.append(grid_results.trial_row(trial, report, errors))
        configs.append(report["config"])
        source, data = report.get("data_source"), report["config"]["data"]["path"]
        reads = report["test_reads"]
    action_param = next(
        (n for n in record["grid"] if resolve_key(Config(), n, "grid.json") == "data.actions"),
        None,
    )
    per_action = grid_results.per_action_rows(rows, action_param) if action_param else None
    paper = None
    if per_action and source == "h36m":
        paper = {
            method: {r["action"]: paper_value(row, r["action"]) for r in per_action}
            for method, row in PAPER_RESULTS.items()
        }
    summary = {
        "experiment": exp.uri,
        "data": data_dir or data,
        "data_source": source,
        "grid": record["grid"],
        "base_settings": grid_results.base_settings(configs),
        "trials": rows,
        "settings": grid_results.pooled_over_seeds(rows),
        "per_action": per_action,
        "paper": paper,
        "test_reads": reads["count"],
        "ledger": reads["ledger"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid_report.md").write_text(grid_results.markdown(summary))
    (out / "grid_report.json").write_text(json.dumps(summary, indent=1, default=str))
    remote = free_storage_dir(exp, folder)
    upload_outputs(out, list(GRID_OUTPUT_FILES), remote)
    for group in summary["settings"]:
        setting = " ".join(f"{k}={v}" for k, v in group["params"].items()) or "the base config"
        spread = (
            "" if group["sd"] is None else f" +- {group['sd']:.1f} (sd over {group['runs']} seeds)"
        )
        print(
            f"[raypose] {setting}: test MPJPE {group['mean']:.1f} mm{spread}, mean over actions; "
            f"mean-pose baseline {group['mean_pose_baseline']:.1f} mm",
            flush=True,
        )
    print(
        f"[raypose] grid report: {(out / 'grid_report.md').resolve()} and {remote.uri}", flush=True
    )
    return summary


def print_result(report: dict, out: Path) -> None:
    """The evaluation's last two lines: the result, and where the report is."""
    print(summary_line(report), flush=True)
    reads = report.get("test_reads")
    if reads:
        print(
            f"[raypose] the test split has been read {reads['count']} time(s) for this "
            f"experiment, this one included ({reads['ledger']})",
            flush=True,
        )
    print(
        f"[raypose] report: {out.resolve() / 'report.md'} and {report['outputs']['storage']}",
        flush=True,
    )


def summary_line(report: dict) -> str:
    """The one-line result: model and mean-pose baseline side by side, both as means over actions
    (each action weighted equally, as PAPER.md's tables are)."""
    mean = report["mean_over_actions"]
    images = "".join(  # the image baselines, in reports that have them
        f", {name} {report[key]['mean_over_actions']:.1f} mm"
        for key, name in IMAGE_BASELINES
        if report.get(key)
    )
    return (
        f"[raypose] mean over actions: MPJPE {mean['mpjpe']:.1f} mm, P-MPJPE {mean['p_mpjpe']:.1f} mm; "
        f"mean-pose baseline MPJPE {report['mean_pose_baseline']['mean_over_actions']:.1f} mm"
        + images
    )


def centre_crops(dataset: PoseDataset, positions: np.ndarray) -> np.ndarray:
    """The uint8 112 x 112 centre crops the network saw, for figures.  [n, 112, 112, 3]"""
    import h5py

    with h5py.File(dataset.path, "r") as f:
        images = np.stack([f["images"][int(dataset.indices[p])] for p in positions])
    return centre_crop(images)


def remembered(memo: dict, key: tuple, compute):
    """memo[key], computed by compute() the first time."""
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def samples_key(dataset: PoseDataset, positions=None) -> tuple:
    """Which samples of which file: the file, and a digest of the rows (at positions) it reads."""
    rows = np.asarray(dataset.indices if positions is None else dataset.indices[positions])
    return (dataset.path, hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64)).hexdigest())


def build_report(pred, actions, test, train, loaded, ckpt_loc, target, memo: dict) -> dict:
    """report.json's content; memo: evaluate's (shared by a grid's trials)."""
    if pred["pred_3d"] is None:
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt_loc.uri} has no regression head (a detection-stage checkpoint); "
            "evaluate a checkpoint from the regression stage"
        )
    names = list(H36M_SKELETON.names)
    metrics = grouped_report(pred["pred_3d"], pred["gt_3d"], actions, names)
    train_poses = train.root_relative_poses()
    baseline = {
        "mpjpe": mean_pose_baseline(train_poses, pred["gt_3d"]),
        "per_action": {
            a: mean_pose_baseline(train_poses, pred["gt_3d"][actions == a])
            for a in sorted(set(actions.tolist()))
        },
    }
    # the same weighting as metrics' mean_over_actions: each action counts once
    baseline["mean_over_actions"] = float(np.mean(list(baseline["per_action"].values())))
    # nearest neighbour and ridge on downsampled crops, fitted on the same training samples;
    # the same for every network tested on the same samples (a seeds grid's trials)
    images = remembered(
        memo,
        ("image_baselines", samples_key(train), samples_key(test, pred["positions"])),
        lambda: image_baselines(
            train,
            train_poses,
            np.array(train.subjects)[train.sample_subjects],
            test,
            pred["positions"],
            pred["gt_3d"],
            actions,
        ),
    )
    report = {
        "checkpoint": ckpt_loc.uri,
        "experiment": target["experiment"].uri if target["experiment"] else None,
        "trial_id": (target["best"] or {}).get("trial_id"),
        "epoch": loaded["state"]["epoch"],
        "stage": loaded["state"]["stage"],
        "config": loaded["config"],
        "test_samples": int(len(pred["gt_3d"])),
        # the paper's Human3.6M figures are comparable only with Human3.6M test data
        "data_source": test.info.get("source"),
        **metrics,
        "mean_pose_baseline": baseline,
        **images,
        # which frames the test split holds and how crops were centred (raypose.data.h36m)
        "test_frames": selection_attrs(test.path),
        "detection": (
            detection_scores(pred["detection_logits"], pred["detection_targets"])
            if pred["detection_logits"] is not None
            else None
        ),
        "manifest": {
            "raypose_version": loaded["manifest"]["raypose_version"],
            "config_sha256": loaded["manifest"]["config_sha256"],
        },
    }
    return report


def paper_rows(source: str | None, actions) -> list:
    """The paper's Human3.6M figures (rows under the results table, then its own table) for
    Human3.6M test data only; for any other data, one line saying why there are none."""
    if source != "h36m":
        return [
            "",
            f"The paper's Human3.6M figures are not shown: this test split is not Human3.6M "
            f"(source {source}), so they are not comparable with it.",
        ]
    lines = []
    for method, row in PAPER_RESULTS.items():
        values = [paper_value(row, a) for a in actions]
        if any(v is not None for v in values):  # the paper's rows line up with our actions
            lines.append(
                f"| {method} | "
                + " | ".join("-" if v is None else f"{v:.2f}" for v in values)
                + " | - |"
            )
    paper_actions = sorted({a for row in PAPER_RESULTS.values() for a in row})
    lines += [
        "",
        "For reference, the paper's Human3.6M numbers (MPJPE mm, S9/S11):",
        "",
        "| method | " + " | ".join(paper_actions) + " |",
        "|---|" + "---|" * len(paper_actions),
    ]
    for method, row in PAPER_RESULTS.items():
        lines.append(
            f"| {method} | "
            + " | ".join(f"{row[a]:.2f}" if a in row else "-" for a in paper_actions)
            + " |"
        )
    return lines


def per_subject(pred_3d, gt_3d, subjects, train_poses) -> dict:
    """MPJPE, N-MPJPE, P-MPJPE and the mean-pose baseline per test subject, with the subject's body
    size (summed bone lengths) over the training poses' mean: a network that sees a centred crop
    cannot tell a body's size, so a subject larger or smaller than the training subjects keeps an
    error that N-MPJPE (scale aligned) and P-MPJPE remove and MPJPE does not."""
    parents = H36M_SKELETON.parents
    train_size = float(body_size(train_poses, parents).mean())
    out = {}
    for s in sorted(set(subjects.tolist())):
        sel = subjects == s
        m = grouped_report(
            pred_3d[sel], gt_3d[sel], np.zeros(int(sel.sum())), list(H36M_SKELETON.names)
        )
        out[str(s)] = {
            "count": int(sel.sum()),
            **m["overall"],
            "mean_pose_mpjpe": mean_pose_baseline(train_poses, gt_3d[sel]),
            "size_vs_train": float(body_size(gt_3d[sel], parents).mean()) / train_size,
        }
    return out


def test_frames_line(report: dict) -> list:
    """The header line on which frames the test split holds and where its crops are centred,
    from the attributes raypose.data.h36m writes; none for data without them."""
    frames = report.get("test_frames") or {}
    if not frames.get("frame_selection"):
        return []
    centre = frames.get("crop_centred_on")
    return [
        f"Test frames: {frames['frame_selection']}"
        + (f"; crops centred on {centre}." if centre else ".")
    ]


def markdown_report(report: dict) -> str:
    actions = sorted(report["per_action"])
    lines = [
        "# raypose evaluation",
        "",
        f"Checkpoint: `{report['checkpoint']}` (epoch {report['epoch']}, {report['stage']} stage)",
        f"Test samples: {report['test_samples']}",
        *test_frames_line(report),
        *(
            [
                f"Test split reads recorded for this experiment: {report['test_reads']['count']} "
                f"(this one included; ledger `{report['test_reads']['ledger']}`)"
            ]
            if report.get("test_reads")
            else []
        ),
        "",
        "MPJPE in mm (Protocol #1, root-aligned); std over samples in brackets.",
        "",
        "| method | " + " | ".join(actions) + " | mean |",
        "|---|" + "---|" * (len(actions) + 1),
    ]
    pa = report["per_action"]
    lines.append(
        "| raypose | "
        + " | ".join(f"{pa[a]['mpjpe']:.2f} ({pa[a]['std_mpjpe']:.2f})" for a in actions)
        + f" | {report['mean_over_actions']['mpjpe']:.2f} |"
    )
    lines.append(
        "| raypose P-MPJPE | "
        + " | ".join(f"{pa[a]['p_mpjpe']:.2f}" for a in actions)
        + f" | {report['mean_over_actions']['p_mpjpe']:.2f} |"
    )
    lines.append(
        "| raypose N-MPJPE | "
        + " | ".join(f"{pa[a]['n_mpjpe']:.2f}" for a in actions)
        + f" | {report['mean_over_actions']['n_mpjpe']:.2f} |"
    )
    bl = report["mean_pose_baseline"]["per_action"]
    lines.append(
        "| mean-pose baseline | "
        + " | ".join(f"{bl[a]:.2f}" for a in actions)
        + f" | {report['mean_pose_baseline']['mean_over_actions']:.2f} |"
    )
    for key, name in IMAGE_BASELINES:
        if report.get(key):
            row = report[key]["per_action"]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{row[a]:.2f}" for a in actions)
                + f" | {report[key]['mean_over_actions']:.2f} |"
            )
    lines += paper_rows(report.get("data_source"), actions)
    if report.get("per_subject"):
        lines += [
            "",
            "## Per subject (mm)",
            "",
            "Body size: the subject's summed bone lengths over the training poses' mean. The "
            "network sees a centred crop, which does not show how large a body is, so a subject "
            "of another size keeps an error that N-MPJPE (scale aligned) removes.",
            "",
            "| subject | samples | body size | MPJPE | N-MPJPE | P-MPJPE | mean-pose baseline | ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, v in report["per_subject"].items():
            lines.append(
                f"| {s} | {v['count']} | {v['size_vs_train']:.3f}x | {v['mpjpe']:.2f} | "
                f"{v['n_mpjpe']:.2f} | {v['p_mpjpe']:.2f} | {v['mean_pose_mpjpe']:.2f} | "
                f"{v['mpjpe'] / v['mean_pose_mpjpe']:.2f}x |"
            )
    lines += [
        "",
        "## Per joint (mm)",
        "",
        "| joint | MPJPE | P-MPJPE | N-MPJPE |",
        "|---|---|---|---|",
    ]
    pj = report["per_joint"]
    for j in pj["mpjpe"]:
        lines.append(
            f"| {j} | {pj['mpjpe'][j]:.2f} | {pj['p_mpjpe'][j]:.2f} | {pj['n_mpjpe'][j]:.2f} |"
        )
    if report["detection"]:
        d = report["detection"]
        top = "-" if d["top_window_accuracy"] is None else f"{100 * d['top_window_accuracy']:.1f} %"
        lines += [
            "",
            f"Detection head: cell accuracy {100 * d['cell_accuracy']:.2f} %, "
            f"most confident window contains the joint for {top} of joints.",
        ]
    if report.get("sweep"):
        sw = report["sweep"]
        lines += [
            "",
            f"Sweep: {report['experiment']}, best trial {report['trial_id']}; "
            f"{sw['trials']} trials, history from {sw['history_from'] or 'nowhere'}.",
        ]
        if sw["note"]:
            lines.append(f"Note: {sw['note']}.")
        if sw.get("report_note"):
            lines.append(f"Note: {sw['report_note']}.")
    if report.get("sweep_report"):
        from raypose.evaluation import report as sweep_report

        lines += [
            "",
            "## Sweep report",
            "",
            sweep_report.markdown_section(report["sweep_report"], level=3),
        ]
    lines += ["", "Figures: " + ", ".join(report.get("figures") or []), ""]
    if report.get("outputs"):
        lines += [f"Outputs: {report['outputs']['local']} and {report['outputs']['storage']}", ""]
    return "\n".join(lines)


def write_figures(out: Path, test, pred, report, study_db, target) -> list:
    """Draw the figures into out; returns their file names.  For an experiment it also sets
    report['sweep'] (where the sweep's history came from, and a note when something is missing)."""
    from raypose.evaluation import figures

    n = min(4, len(pred["positions"]))
    figures.skeleton_figure(
        centre_crops(test, pred["positions"][:n]),
        pred["pred_3d"][:n],
        pred["gt_3d"][:n],
        out / "skeletons.png",
    )
    figures.joint_error_figure(
        report["per_joint"]["mpjpe"],
        out / "joint_errors.png",
        baseline=report["mean_pose_baseline"]["mpjpe"],
    )
    names = ["skeletons.png", "joint_errors.png"]
    report["sweep"] = report["sweep_report"] = None
    if target["experiment"] is not None:
        sweep = sweep_history(target["best"] or {}, study_db, study_copy(target["experiment"]))
        if sweep["trials"]:
            figures.sweep_history_figure(
                sweep["trials"],
                out / "sweep_history.png",
                metric=(target["best"] or {}).get("metric", "val_mpjpe"),
            )
            names.append("sweep_history.png")
        figures.param_importance_figure(
            sweep["importances"],
            out / "param_importance.png",
            note=None if sweep["importances"] else sweep["note"],
        )
        names.append("param_importance.png")
        report["sweep"] = {
            "study_copy": study_copy(target["experiment"]).uri if study_db else None,
            "history_from": sweep["source"],
            "trials": len(sweep["trials"]),
            "note": sweep["note"],
            "report_note": None,
        }
        # the sweep report's sections (raypose report), drawn from the same best.json and study
        from raypose.evaluation import report as sweep_report

        best = target["best"] or {}
        try:
            sweep_report.check_best(best, target["experiment"].join("best.json").uri)
        except sweep_report.SweepReportError as e:
            report["sweep"]["report_note"] = f"sweep report left out: {e}"
            report["sweep_report"] = None
        else:
            summary = sweep_report.summarise(
                best, target["experiment"].uri, sweep["importances"], sweep["note"]
            )
            curves = sweep_report.write_learning_curves(out, summary)
            summary["figures"] = curves + ["param_importance.png"]
            names[2:2] = curves
            report["sweep_report"] = summary
    return names


# ----------------------------------------------------------------------------------------------
# Command line: raypose evaluate / jobs/evaluate.py


def add_arguments(parser) -> None:
    parser.add_argument("uri", help="experiment URI (with best.json) or checkpoint URI")
    parser.add_argument(
        "--data",
        help="data directory with test.h5, or s3://bucket/prefix with its "
        "manifest.json (default: the checkpoint config's)",
    )
    parser.add_argument("--out", help="local output folder (default: runs/evaluation/<checkpoint>)")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the report in --out if it holds one (default: refuse)",
    )
    parser.add_argument(
        "--address",
        help="run the evaluation as a Ray task on this cluster "
        "(HOST:PORT or ray://HOST:PORT; with --gpu the task asks for a GPU); "
        "default: here, without Ray",
    )


def run(args) -> int:
    # raypose's errors reach raypose.cli.main, which prints them as one line and exits 2
    if args.address and resolve(args.uri)["kind"] == "grid":
        raise ConfigError(
            "--address: a grid sweep's evaluation runs here (one evaluation per trial); drop "
            "--address, or evaluate one trial's checkpoint on the cluster"
        )
    if args.address:
        evaluate_on_cluster(
            args.uri, args.data, args.out, args.gpu, args.batch_size, args.force, args.address
        )
    else:
        evaluate(args.uri, args.data, args.out, args.gpu, args.batch_size, args.force)
    return 0


def evaluate_task(uri, data_dir, use_gpu, batch_size, storage_env, local_label) -> dict:
    """Runs on a Ray node: the evaluation into a temporary folder (it also writes next to the
    checkpoint in storage); returns {file name: bytes} of that folder for the caller's --out."""
    import os

    os.environ.update(storage_env)  # the caller's storage endpoint (never credentials)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "evaluation"
        evaluate(uri, data_dir, str(out), use_gpu, batch_size, local_label=local_label)
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def evaluate_on_cluster(
    uri: str,
    data_dir: str | None,
    out_dir: str | None,
    use_gpu: bool,
    batch_size: int,
    force: bool,
    address: str,
) -> None:
    """`raypose evaluate --address`: the evaluation runs as one Ray task on the cluster (a GPU
    node with --gpu) and its outputs come back into --out here. --data and the storage must be
    visible from the cluster's nodes (object storage, or a shared path)."""
    import ray

    from raypose.cluster.driver import forwarded_env, init_ray

    validate.ray_address(address, "--address")
    check_inputs(uri, data_dir, out_dir, False, batch_size, force)  # --gpu: the node's GPU
    folder = f"evaluation-{posixpath.basename(storage.parse(uri).path.rstrip('/'))}"
    out = Path(out_dir) if out_dir else free_local_dir(Path("runs") / "evaluation" / folder)
    init_ray(address, command="evaluate")
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0)(evaluate_task)
    print(
        f"[raypose] evaluating {uri} as a Ray task on {address}" + (" (1 GPU)" if use_gpu else ""),
        flush=True,
    )
    files = ray.get(
        task.remote(uri, data_dir, use_gpu, batch_size, forwarded_env(), str(out.resolve()))
    )
    with validate.staged_folder(out, OUTPUT_FILES) as stage:
        for name, data in files.items():
            (stage / name).write_bytes(data)
    print_result(json.loads(files["report.json"]), out)
