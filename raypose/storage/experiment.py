"""A sweep's experiment in storage: the one owner of its files' names, of their reading and
writing, and of trial states. raypose.search.sweep writes sweep.json (the settings it started
with, which a resume keeps) and best.json (its result, naming the best checkpoint) through this
module and keeps its Optuna study's copy at study_copy(); raypose.evaluation reads them here.

  <storage>/<name>/sweep.json   <storage>/<name>/best.json   <storage>/<name>/optuna.db
  <storage>/<name>/grid.json    a grid sweep's trials and their checkpoints (instead of best.json)
  <storage>/<name>/test_reads.json   the test-split ledger: every evaluation on test, in order
"""

import datetime
import json
from pathlib import Path

from raypose import storage, validate
from raypose.storage import checkpoint

BEST_FILE = "best.json"
GRID_FILE = "grid.json"
LEDGER_FILE = "test_reads.json"
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


def write_grid(exp: storage.Location, record: dict) -> storage.Location:
    """Write a grid sweep's grid.json; returns where."""
    loc = exp.join(GRID_FILE)
    storage.write_text(loc, json.dumps(record, indent=1, default=str))
    return loc


def read_grid(exp: storage.Location) -> dict:
    """A grid sweep's grid.json, every checkpoint it names checked to lie inside the experiment."""
    loc = exp.join(GRID_FILE)
    try:
        record = json.loads(storage.read_text(loc))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvaluationError(
            f"{loc.uri} is not JSON; a grid sweep writes it when it finishes"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("trials"), list):
        raise EvaluationError(f"{loc.uri} is not a raypose grid.json (no 'trials' list)")
    for i, trial in enumerate(record["trials"]):
        if not isinstance(trial, dict) or not isinstance(trial.get("params"), dict):
            raise EvaluationError(f"{loc.uri}: trials[{i}] has no 'params' mapping")
        if trial.get("checkpoint") is not None:
            inside(exp, trial["checkpoint"], f"{loc.uri}: trials[{i}]")
    return record


def inside(exp: storage.Location, ckpt_uri, where: str) -> storage.Location:
    """The checkpoint's location when it lies under the experiment (same scheme and bucket, a path
    below it); EvaluationError otherwise. An experiment's files may be edited by anyone with write
    access to storage: an evaluation must not read or write anywhere they point."""
    refused = (
        f"{where}: checkpoint {validate.shown(ckpt_uri)} is not inside the experiment "
        f"{exp.uri}; an experiment's files may only name checkpoints under it"
    )
    if not isinstance(ckpt_uri, str):
        raise EvaluationError(refused)
    try:
        ckpt_loc = storage.parse(ckpt_uri)
    except storage.StorageError as e:
        raise EvaluationError(f"{refused} ({e})") from None
    if ckpt_loc.scheme != exp.scheme or not ckpt_loc.path.startswith(exp.path.rstrip("/") + "/"):
        raise EvaluationError(refused)
    return ckpt_loc


def ledger_location(checkpoint_loc: storage.Location, experiment: storage.Location | None):
    """Where the test-split reads of a checkpoint are recorded: its experiment, or for a checkpoint
    of a plain training run the run's folder (the checkpoint's parent)."""
    if experiment is not None:
        return experiment.join(LEDGER_FILE)
    parent = checkpoint_loc.path.rstrip("/").rsplit("/", 1)[0]
    return storage.Location(checkpoint_loc.scheme, parent).join(LEDGER_FILE)


def read_ledger(ledger: storage.Location) -> list:
    """The ledger's entries, oldest first ([] when there is none)."""
    try:
        entries = json.loads(storage.read_text(ledger))
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EvaluationError(
            f"{ledger.uri} is not JSON; it is raypose's record of every evaluation on the test "
            "split: restore it, or move it aside to start a new record"
        ) from None
    if not isinstance(entries, list):
        raise EvaluationError(f"{ledger.uri} is not a raypose test-read ledger (not a list)")
    return entries


def record_test_read(ledger: storage.Location, entry: dict) -> int:
    """Append one evaluation on the test split to the ledger; returns how many reads it holds.
    entry: what was read and with what (checkpoint, data, samples); the time is added here."""
    entries = read_ledger(ledger)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries.append({"time": stamp, **entry})
    storage.write_text(ledger, json.dumps(entries, indent=1, default=str))
    return len(entries)


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
    if not fs.exists(best_loc.path) and fs.exists(loc.join(GRID_FILE).path):
        return {"kind": "grid", "checkpoint": None, "best": None, "experiment": loc}
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
    ckpt_loc = inside(loc, ckpt_uri, best_loc.uri)
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
