"""A sweep's experiment in storage: the one owner of its files' names, of their reading and
writing, and of trial states. raypose.search.sweep writes sweep.json (the settings it started
with, which a resume keeps) and best.json (its result, naming the best checkpoint) through this
module and keeps its Optuna study's copy at study_copy(); raypose.evaluation reads them here.

  <storage>/<name>/sweep.json   <storage>/<name>/best.json   <storage>/<name>/optuna.db
"""

import json
from pathlib import Path

from raypose import storage, validate
from raypose.storage import checkpoint

BEST_FILE = "best.json"
SWEEP_RECORD = "sweep.json"
STUDY_COPY = "optuna.db"


def experiment_exists(loc: storage.Location) -> bool:
    """Whether loc holds a sweep that Ray Tune has started (its experiment state is there)."""
    fs = storage.filesystem(loc)
    return fs.exists(loc.path) and any(
        "experiment_state" in p for p in fs.ls(loc.path, detail=False)
    )


def read_sweep_record(exp: storage.Location) -> dict | None:
    """The settings the sweep started with; None for a sweep without sweep.json."""
    try:
        return json.loads(storage.read_text(exp.join(SWEEP_RECORD)))
    except FileNotFoundError:
        return None


def write_sweep_record(exp: storage.Location, record: dict) -> None:
    storage.write_text(exp.join(SWEEP_RECORD), json.dumps(record, indent=1))


def write_best(exp: storage.Location, best: dict) -> storage.Location:
    """Write the sweep's best.json; returns where."""
    loc = exp.join(BEST_FILE)
    storage.write_text(loc, json.dumps(best, indent=1, default=str))
    return loc


class EvaluationError(RuntimeError):
    """The URI names neither a finished experiment nor a checkpoint, or an output would
    overwrite an earlier one."""


def resolve(uri: str) -> dict:
    """{'kind': 'experiment'|'checkpoint', 'checkpoint': Location, 'best': dict|None}

    An experiment's best.json must name a checkpoint under the experiment itself (same scheme
    and bucket, a path below the experiment's); EvaluationError otherwise."""
    loc = storage.parse(uri)
    fs = storage.filesystem(loc)
    try:
        present = fs.exists(loc.path)
    except Exception as e:
        raise storage.StorageError(f"{loc.uri} is unreachable: {type(e).__name__}") from None
    if not present:
        raise EvaluationError(f"{loc.uri} does not exist")
    if fs.exists(loc.join(checkpoint.MANIFEST_FILE).path):
        return {"kind": "checkpoint", "checkpoint": loc, "best": None, "experiment": None}
    best_loc = loc.join(BEST_FILE)
    if not fs.exists(best_loc.path):
        names = [Path(p).name for p in fs.ls(loc.path, detail=False)]
        if any(n.startswith("experiment_state") for n in names) or "train" in names:
            raise EvaluationError(
                f"experiment {loc.uri} has no best.json: the sweep has not finished "
                "(continue it with raypose tune --resume), or pass a checkpoint URI"
            )
        checkpoints = sorted(n for n in names if n.startswith("epoch_"))
        if checkpoints:  # a training run's folder
            raise EvaluationError(
                f"{loc.uri} is a training run, not a checkpoint: it holds "
                f"{', '.join(checkpoints)}; pass one of them, e.g. "
                f"{loc.join(checkpoints[-1]).uri}"
            )
        raise EvaluationError(
            f"{loc.uri} is neither an experiment (no best.json) nor a checkpoint "
            f"(no {checkpoint.MANIFEST_FILE})"
        )
    best = read_best_json(best_loc)
    try:
        ckpt_uri = best["checkpoint"]
    except (KeyError, TypeError):
        raise EvaluationError(
            f"{best_loc.uri} is not a raypose best.json (no 'checkpoint' key)"
        ) from None
    if not ckpt_uri:
        raise EvaluationError(f"{best_loc.uri} names no checkpoint")
    # the evaluation reads that checkpoint and writes its report next to it: a best.json edited
    # or copied to point elsewhere (/etc, another bucket, ../other) must not take it there
    refused = (
        f"{best_loc.uri}: checkpoint {validate.shown(ckpt_uri)} is not inside the "
        f"experiment {loc.uri}; best.json may only name a checkpoint under it"
    )
    if not isinstance(ckpt_uri, str):
        raise EvaluationError(refused)
    try:
        ckpt_loc = storage.parse(ckpt_uri)
    except storage.StorageError as e:
        raise EvaluationError(f"{refused} ({e})") from None
    if ckpt_loc.scheme != loc.scheme or not ckpt_loc.path.startswith(loc.path.rstrip("/") + "/"):
        raise EvaluationError(refused)
    return {"kind": "experiment", "checkpoint": ckpt_loc, "best": best, "experiment": loc}


def read_best_json(best_loc: storage.Location):
    """The parsed best.json; an EvaluationError naming the file when it is not JSON."""
    try:
        return json.loads(storage.read_text(best_loc))
    except json.JSONDecodeError as e:
        raise EvaluationError(
            f"{best_loc.uri} is not JSON ({e.msg} at line {e.lineno}); a sweep "
            "writes best.json when it finishes"
        ) from None
    except UnicodeDecodeError:
        raise EvaluationError(
            f"{best_loc.uri} is not JSON (not UTF-8 text); a sweep writes "
            "best.json when it finishes"
        ) from None


def study_copy(experiment: storage.Location) -> storage.Location:
    """Where a sweep keeps the copy of its Optuna study (raypose.search.sweep's CopyStudy callback)."""
    return experiment.join(STUDY_COPY)


def fetch_study_copy(experiment: storage.Location, local_dir: Path) -> Path | None:
    """The experiment's Optuna study copy, downloaded into local_dir; None when there is none."""
    copy = study_copy(experiment)
    if not storage.exists(copy):
        return None
    local = Path(local_dir) / "optuna.db"
    storage.filesystem(copy).get_file(copy.path, str(local))
    return local


def upload_outputs(out: Path, names, remote: storage.Location) -> None:
    """Copy out/<name> for each name, in order, into the storage folder remote.  Callers put the
    file that marks a complete folder (report.json) last."""
    fs = storage.filesystem(remote)
    if remote.scheme == "file":
        Path(remote.path).mkdir(parents=True, exist_ok=True)
    for name in names:
        fs.put_file(str(out / name), remote.join(name).path)


def free_local_dir(base: Path) -> Path:
    """base, or base-2, base-3 ... whichever does not exist yet."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def free_storage_dir(parent: storage.Location, name: str) -> storage.Location:
    """parent/name, or parent/name-2, name-3 ... whichever does not exist in storage yet."""
    fs = storage.filesystem(parent)
    candidate, n = parent.join(name), 1
    while fs.exists(candidate.path):
        n += 1
        candidate = parent.join(f"{name}-{n}")
    return candidate


TRIAL_STATES = ("COMPLETE", "PRUNED", "ERROR")


def trial_state(row: dict) -> str:
    """COMPLETE, PRUNED or ERROR: a best.json trial row's own 'state', or, in files written before
    rows carried one, read off its 'error' and 'stopped_early'."""
    state = str(row.get("state") or "").upper()
    if state in TRIAL_STATES:
        return state
    if row.get("error"):
        return "ERROR"
    return "PRUNED" if row.get("stopped_early") else "COMPLETE"
