"""Hyperparameter search: Ray Tune driven by Optuna (seeded multivariate TPE, define-by-run),
each trial a Ray Train run, ASHA early stopping that never judges a trial without a regression head.

Where Ray plugs in is marked `# Ray:`.  Layout of an experiment in storage:

  <storage>/<name>/                     Tune's experiment state and one folder per trial
                                        (result.json, progress.csv, TensorBoard event files)
  <storage>/<name>/train/<trial_id>/    that trial's Ray Train run: epoch_NNNN checkpoints
  <storage>/<name>/sweep.json           the settings the sweep started with (what --resume keeps)
  <storage>/<name>/optuna.db            the Optuna study (SQLite): the study itself for local
                                        storage, a copy refreshed per trial for object storage
  <storage>/<name>/best.json            the best trial: id, params, config, metric, epoch, checkpoint URI
  <storage>/<name>/grid.json            instead of best.json for a grid sweep (a space with a grid
                                        parameter, e.g. one network per action or one setting over
                                        several seeds): every trial with its checkpoint

How trials are compared. Every trial reports, per epoch, `best_val_mpjpe`: the best validation
MPJPE its regression head has reached so far. ASHA (on the `epoch` axis, so trials are compared at
equal training compute), Optuna (each epoch as an intermediate value; the trial's value is the
last one) and best.json all use that one number. A pretrain trial's detection stage has no
regression head: its results are never judged by ASHA nor told to Optuna, so a pretrain trial is
first compared at the first rung it reaches with a head, against joint trials of the same epoch.
Trials that ASHA stops are recorded in the Optuna study as PRUNED, with their value.

Every sweep's first trial runs the paper's settings (lrn_alpha 0.0025, lrn_beta 0.75, lambda 1,
joint schedule, the default optimiser) on the parameters the space searches, so every sweep says
how far its best trial beats them. ASHA never stops that trial (its results still count at every
rung), so the comparison is at the full number of epochs.

A grid sweep (raypose.search.space: a `grid` parameter) runs every combination once, for every
epoch, with neither Optuna nor ASHA: nothing is chosen among its trials. Each trial's checkpoint is
its best on validation, or its last when the run holds nothing out (data.val_subjects=[], the
paper's protocol); `raypose evaluate` on the experiment tests each one (raypose.evaluation.grid).
"""

import hashlib
import math
import os
import statistics
import time
from pathlib import Path

from raypose import console, storage, validate
from raypose.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    flatten,
    get_value,
    gpus_per_worker_arg,
    load_config,
    resolve_key,
    set_gpus_per_worker,
    set_value,
    set_workers,
)
from raypose.search.searcher import (
    METRIC,
    MODE,
    STUDY_URL_ENV,
    check_study_db,
    judged,
    make_scheduler,
    make_searcher,
    sqlite_path,
    trial_state,
)
from raypose.search.space import load_space
from raypose.storage import runlock, seal
from raypose.storage.experiment import (
    SWEEP_RECORD,
    experiment_exists,
    read_sweep_record,
    study_copy,
    write_best,
    write_grid,
    write_sweep_record,
)

TRIAL_DRIVER_MEMORY = 768 * 1024**2  # bytes; see build_tuner
# The paper's settings (PAPER.md), by config key; everything else keeps the base config's default
PAPER_SETTINGS = {
    "model.lrn_alpha": 0.0025,
    "model.lrn_beta": 0.75,
    "loss.detection_weight": 1.0,
    "schedule.kind": "joint",
}


# ----------------------------------------------------------------------------------------------
# Runs as one Tune trial (a Tune function): builds and runs a Ray Train trainer


def train_driver_fn(
    params: dict, base_config: dict, experiment: str, storage_env: dict, data: dict
):
    """One Tune trial: a Ray Train run of the trial's config, whose reports reach Tune through
    Ray's TuneReportCallback (Ray's documented Train V2 + Tune pattern)."""
    started = time.time()  # the trial's start, for the workers' startup_seconds
    from ray import tune  # Ray: inside a Tune function only ray.tune.*

    from raypose.cluster.ray_internals import TuneReportCallback
    from raypose.train.run import build_trainer

    # the driver's storage endpoint (never credentials: those come from the node's environment)
    os.environ.update(storage_env)
    cfg = config_from_dict(base_config)
    for key, value in params.items():
        set_value(cfg, key, value, f"trial parameter {key}")
    cfg.validate()
    trial_id = tune.get_context().get_trial_id()
    loc = storage.parse(cfg.storage.uri).join(experiment, "train")
    cfg.storage.name = f"{experiment}/train/{trial_id}"
    trainer = build_trainer(
        cfg,
        trial_id,
        loc,
        callbacks=[TuneReportCallback()],
        created_at=started,
        # the driver's data summary holds unless the trial changed the data
        data=data if cfg.to_dict()["data"] == base_config["data"] else None,
    )
    # Ray: Train V2 raises TrainingFailedError on failure, which fails this trial
    trainer.fit()


def paper_defaults_point(space, cfg: Config) -> tuple:
    """(point, missing): the enqueued first trial, in the space's own parameter names.

    Each searched parameter takes the paper's value (PAPER_SETTINGS) or else the base config's
    value, where that value lies in the parameter's range and its condition holds; the rest are
    left to the sampler. `missing` lists the paper's settings the space cannot express (a paper
    key that is not searched and whose base value differs), so a report can say the trial is not
    exactly the paper's."""
    point = {}
    searched = set()
    if space.is_grid:  # nothing is compared among a grid's trials
        return {}, []
    for p in space.parameters:
        if p.distribution == "fixed" or not p.active(point):
            continue
        searched.add(p.key)
        value = PAPER_SETTINGS.get(p.key, get_value(cfg, p.key))
        if _in_range(p, value):
            point[p.name] = value
    missing = sorted(
        k for k, v in PAPER_SETTINGS.items() if k not in searched and get_value(cfg, k) != v
    )
    return point, missing


def _in_range(p, value) -> bool:
    if p.distribution == "categorical":
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if p.distribution == "int":
        return isinstance(value, int) and p.low <= value <= p.high and (value - p.low) % p.step == 0
    return p.low <= value <= p.high


# ----------------------------------------------------------------------------------------------
# Runs on the driver


def default_study_url(loc: storage.Location, name: str) -> str:
    """The Optuna study of the experiment <loc>/<name> unless --study-db names another: inside the
    experiment folder for local storage; for object storage, a local cache of this one experiment,
    keyed by its full URI and S3 endpoint, so that two sweeps of the same name in two buckets (or
    two prefixes, or two endpoints) never share a study. The cache is copied to
    <storage>/<name>/optuna.db after each trial and seeded from that copy on resume."""
    exp = loc.join(name)
    if loc.scheme == "file":
        return f"sqlite:///{Path(study_copy(exp).path)}"
    root = Path(os.environ.get("RAYPOSE_LOCAL_DIR") or Path.home() / ".raypose" / "experiments")
    key = hashlib.sha256(f"{storage.endpoint_url() or ''} {exp.uri}".encode()).hexdigest()[:12]
    folder = root / f"{key}-{name.replace('/', '_')}"
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def _creatable(db: Path) -> bool:
    """Whether this machine can hold a SQLite file at db."""
    folder = db.parent
    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK)


def check_no_stale_study(study_url: str, name: str) -> None:
    """A new sweep must not silently continue an Optuna study of the same name left in the
    database by an earlier sweep (Ray's OptunaSearch loads an existing study)."""
    db = sqlite_path(study_url)
    if db is not None and not db.exists():
        return
    import optuna

    try:
        names = [s.study_name for s in optuna.study.get_all_study_summaries(storage=study_url)]
    except Exception as e:  # an unreachable or corrupt database
        raise ConfigError(
            f"--study-db {study_url}: cannot open the Optuna database ({type(e).__name__}: {e})"
        ) from None
    if name in names:
        gone = f" (or delete {db} if that sweep is gone)" if db is not None else ""
        raise ConfigError(
            f"the Optuna database {study_url} already holds a study named {name!r} "
            "from an earlier sweep; pass --resume to continue that sweep, another "
            f"--name, or another --study-db{gone}"
        )


def copy_study(db: Path, target: storage.Location) -> None:
    """Upload a consistent snapshot of the SQLite study (sqlite3's backup API: a trial may be
    writing to it at this moment) to target."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / db.name
        source, copy = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(snapshot)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        storage.filesystem(target).put_file(str(snapshot), target.path)


def make_copy_study_callback(study_url: str, target: storage.Location):
    """A Tune callback that copies the SQLite study into the experiment's storage whenever a trial
    starts, reports, ends or fails, so that evaluation finds it and a resume on a fresh machine
    gets every trial the searcher has created, running ones included (with a copy made only when
    trials end, a resume got a study without the running trials, and Optuna then numbered new
    trials over them)."""
    from ray.tune import Callback

    class CopyStudy(Callback):
        def _copy(self):
            db = sqlite_path(study_url)
            if (
                target.scheme == "file"
                and db is not None
                and db.resolve() == Path(target.path).resolve()
            ):
                return  # the study already lives in the experiment's folder
            if db is not None and db.exists():
                copy_study(db, target)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._copy()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._copy()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._copy()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._copy()

        def on_experiment_end(self, trials, **info):
            self._copy()

    return CopyStudy()


def build_tuner(
    cfg: Config,
    space,
    name: str,
    samples: int,
    max_concurrent: int,
    study_url: str,
    resume: bool,
    paper_point: dict | None = None,
    grid: dict | None = None,
):
    """grid: {name: [values]} of a grid sweep (every combination once, no searcher or scheduler)."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback

    loc = storage.parse(cfg.storage.uri)
    # Tune's own records go through a filesystem that seals the pickles among them (raypose.storage.seal)
    storage_path, storage_fs = seal.tune_storage(loc)
    from raypose.cluster.driver import forwarded_env, prepare_data

    # the data are validated and the baseline computed once, here, for every trial's workers
    trainable = tune.with_parameters(
        train_driver_fn,
        base_config=cfg.to_dict(),
        experiment=name,
        storage_env=forwarded_env(),
        data=prepare_data(cfg),
    )
    # the Tune function only drives a Ray Train run, whose workers hold the CPUs/GPUs: it asks for
    # no CPU, and for the memory a process that imports Ray Tune, Ray Train and torch takes
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    callbacks = [
        TBXLoggerCallback(),
        console.make_sweep_callback(samples, cfg.schedule.epochs, METRIC, judged, space.names),
    ]
    if study_url:  # a grid sweep has no Optuna study
        callbacks.insert(1, make_copy_study_callback(study_url, study_copy(loc.join(name))))
    if resume:
        # Ray: finished trials are kept; unfinished ones restart and their Ray Train run resumes
        # from its latest checkpoint (same trial id -> same Train run name)
        return tune.Tuner.restore(
            loc.join(name).path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        callbacks=callbacks,
        # a trial lost with its node (the Tune function's process) is run again under the same
        # trial id, so its Ray Train run resumes from the trial's own latest checkpoint
        failure_config=tune.FailureConfig(max_failures=cfg.storage.max_failures),
        # Tune's status tables go to the log file; the sweep's own lines come from
        # console.make_sweep_callback
        verbose=1 if console.verbose() else 0,
    )
    if grid:
        # Ray: every combination of the grid once (num_samples=1 repeats the grid once), in
        # file order, first in first out
        return tune.Tuner(
            trainable,
            param_space={
                **space.fixed(),
                **{name: tune.grid_search(values) for name, values in grid.items()},
            },
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=max_concurrent),
            run_config=run_config,
        )
    return tune.Tuner(  # Ray: one trial = one Tune function = one Ray Train run
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(
                space,
                cfg.seed,
                study_url,
                name,
                points_to_evaluate=[paper_point] if paper_point else (),
                concurrent=max_concurrent > 1,
                samples=samples,
            ),
            scheduler=make_scheduler(cfg.schedule.epochs, reference=paper_point),
            num_samples=samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=run_config,
    )


HISTORY_KEYS = ("epoch", "val_mpjpe", "stage", "has_regression_head")


def summarise(
    result_grid,
    wall_seconds: float,
    max_concurrent: int,
    space_names,
    paper_point: dict | None = None,
) -> tuple:
    """(rows, text, share): one row per trial (with its per-epoch history), a table for people,
    and the share of the sweep's slot time spent inside training epochs."""
    rows = []
    for r in result_grid:
        df = r.metrics_dataframe
        history = [] if df is None or df.empty else df.to_dict("records")
        with_head = [h for h in history if judged(h) and h.get("val_mpjpe") is not None]
        best = min(with_head, key=lambda h: h["val_mpjpe"]) if with_head else None
        params = {k: v for k, v in (r.config or {}).items() if k in space_names}
        stages = {h.get("stage") for h in history}
        startup = [
            h["startup_seconds"] for h in history[:1] if h.get("startup_seconds") is not None
        ]
        rows.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
                "params": params,
                "state": trial_state(history[-1] if history else None, r.error is not None),
                "schedule": "joint" if "joint" in stages or not stages else "pretrain",
                "is_paper_defaults": bool(paper_point)
                and all(params.get(k) == v for k, v in paper_point.items()),
                "epochs": int(max([h.get("epoch", 0) for h in history] or [0])),
                "best_val_mpjpe": best["val_mpjpe"] if best else None,
                "best_epoch": int(best["epoch"]) if best else None,
                "checkpoint_path": best.get("checkpoint_path") if best else None,
                # the newest checkpoint with a regression head: a grid trial's result when the run
                # holds nothing out for validation
                "last_checkpoint_path": next(
                    (
                        _plain(h.get("checkpoint_path"))
                        for h in reversed(history)
                        if h.get("has_regression_head") and _plain(h.get("checkpoint_path"))
                    ),
                    None,
                ),
                "stopped_early": bool(history)
                and history[-1].get("epoch", 0) < history[-1].get("epochs_planned", 0),
                "epoch_seconds": float(sum(h.get("epoch_seconds", 0.0) for h in history)),
                "startup_seconds": startup[0] if startup else None,
                "val_mean_pose_mpjpe": _plain(history[-1].get("val_mean_pose_mpjpe"))
                if history
                else None,
                "time_total_s": float((r.metrics or {}).get("time_total_s", 0.0)),
                "error": None if r.error is None else type(r.error).__name__,
                "history": [
                    {
                        k: (None if k == "val_mpjpe" and not judged(h) else _plain(h.get(k)))
                        for k in HISTORY_KEYS
                    }
                    for h in history
                ],
            }
        )
    paper_rows = [r for r in rows if r["is_paper_defaults"]]
    for extra in paper_rows[1:]:  # only the enqueued (first) one is the paper's trial
        extra["is_paper_defaults"] = False
    total_epoch_seconds = sum(r["epoch_seconds"] for r in rows)
    share = total_epoch_seconds / max(wall_seconds * max(max_concurrent, 1), 1e-9)
    lines = [f"{'trial':<10} {'state':<8} {'epochs':>6} {'best mm':>9} {'epoch s':>8}  params"]
    for r in sorted(rows, key=lambda r: (r["best_val_mpjpe"] is None, r["best_val_mpjpe"] or 0)):
        best = f"{r['best_val_mpjpe']:.1f}" if r["best_val_mpjpe"] is not None else "-"
        params = " ".join(f"{k}={console.format_value(v)}" for k, v in r["params"].items())
        flag = " (paper settings)" if r["is_paper_defaults"] else ""
        flag += f" ERROR {r['error']}" if r["error"] else ""
        lines.append(
            f"{r['trial_id']:<10} {r['state']:<8} {r['epochs']:>6} {best:>9} "
            f"{r['epoch_seconds']:>8.1f}  {params}{flag}"
        )
    startups = sorted(r["startup_seconds"] for r in rows if r["startup_seconds"] is not None)
    lines.append(
        f"sweep wall time {wall_seconds:.1f} s; time inside training epochs "
        f"{total_epoch_seconds:.1f} s summed over trials = {100 * share:.1f} % of "
        f"{max_concurrent} concurrent slot(s) x wall time"
        + (
            f"; median start to first training step {statistics.median(startups):.1f} s"
            if startups
            else ""
        )
    )
    return rows, "\n".join(lines), share


def _plain(value):
    """numpy scalars and NaN from a metrics dataframe as JSON-friendly Python values."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def checkpoint_uri(loc: storage.Location, path: str | None) -> str | None:
    if not path:
        return None
    return f"s3://{path}" if loc.scheme == "s3" else path


DEFAULT_SAMPLES = 8
# what a resumed sweep takes from this invocation (for trials that start or restart): where the
# data is, storage settings of each trial's run, and the trial's workers; everything else stays
# as the sweep started, since Tune restores its searcher, scheduler and trial count
APPLIED_ON_RESUME = ("data.path", "storage.", "scaling.")


def sweep_record(
    cfg: Config,
    space_path: str,
    samples: int,
    max_concurrent: int,
    study_url: str | None,
    grid: dict | None = None,
) -> dict:
    """The settings a sweep starts with, stored as <storage>/<name>/sweep.json."""
    return {
        "grid": grid,
        "samples": samples,
        "max_concurrent": max_concurrent,
        "study_url": study_url,
        "space": str(space_path),
        "space_sha256": hashlib.sha256(Path(space_path).read_bytes()).hexdigest(),
        "config": cfg.to_dict(),
    }


def resume_settings(
    exp: storage.Location,
    cfg: Config,
    space_path: str,
    samples: int | None,
    max_concurrent: int | None,
    study_url: str | None,
) -> dict:
    """The stored settings a resumed sweep keeps. Raises one ConfigError that names every flag
    asking for something a resume cannot apply (None means the flag was not given)."""
    from raypose.cluster.driver import stored_settings

    stored = read_sweep_record(exp)
    given = {"--samples": samples, "--max-concurrent": max_concurrent, "--study-db": study_url}
    if stored is None:
        refused = [f"{flag} {value}" for flag, value in given.items() if value is not None]
        if refused:
            raise ConfigError(
                f"--resume cannot apply {', '.join(refused)}: {exp.uri} has no "
                f"{SWEEP_RECORD}, so the sweep keeps the settings Tune saved; drop "
                "those flags or start a new sweep with another --name"
            )
        return {"samples": None, "max_concurrent": None, "study_url": None}
    refused = [
        f"{flag} {value} (the sweep has {stored[key]})"
        for (flag, value), key in zip(given.items(), ("samples", "max_concurrent", "study_url"))
        if value is not None and value != stored[key]
    ]
    if hashlib.sha256(Path(space_path).read_bytes()).hexdigest() != stored["space_sha256"]:
        refused.append(
            f"--space {space_path} (differs from the space the sweep started with, "
            f"{stored['space']})"
        )
    ours, theirs = flatten(cfg.to_dict()), stored_settings(stored["config"])
    refused += [
        f"{k} {ours.get(k)!r} (the sweep has {theirs.get(k)!r})"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k) and not k.startswith(APPLIED_ON_RESUME)
    ]
    if refused:
        raise ConfigError(
            f"--resume cannot apply {'; '.join(refused)}: a resumed sweep keeps its "
            "trial count, concurrency, search space, Optuna study and base config; "
            "drop those flags or start a new sweep with another --name"
        )
    return {k: stored[k] for k in ("samples", "max_concurrent", "study_url")}


def seed_study(study_url: str, exp: storage.Location) -> None:
    """On resume: a SQLite study missing on this machine is restored from the experiment's copy."""
    db = sqlite_path(study_url)
    copy = study_copy(exp)
    if db is None or db.exists() or not storage.exists(copy):
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        storage.filesystem(exp).get_file(copy.path, str(db))
    except OSError as e:
        raise ConfigError(
            f"--resume: the sweep's Optuna study {study_url} is missing here and "
            f"cannot be restored from {copy.uri} ({e.strerror or e}); resume on the "
            "machine that started the sweep"
        ) from None


def existing_checkpoint(loc: storage.Location, rows: list) -> dict:
    """The best of summarise's trial rows whose best checkpoint exists in storage (its manifest
    is there): best.json never names a checkpoint that retention or anything else deleted. A
    better trial passed over for that reason gets one printed line."""
    from raypose.storage.checkpoint import MANIFEST_FILE

    for row in sorted(rows, key=lambda r: r["best_val_mpjpe"]):
        uri = checkpoint_uri(loc, row["checkpoint_path"])
        if uri and storage.exists(storage.parse(uri).join(MANIFEST_FILE)):
            return row
        print(
            f"[raypose] trial {row['trial_id']}: its best checkpoint ({uri}) is not in storage; "
            "best.json names the next trial",
            flush=True,
        )
    raise RuntimeError(
        "no trial's best checkpoint is in storage (with a regression head); "
        "see the trial errors above"
    )


def run_sweep(
    cfg: Config,
    space_path: str,
    name: str,
    samples: int | None,
    max_concurrent: int | None,
    resume: bool | str = False,
    study_url: str | None = None,
    address: str | None = None,
) -> dict:
    """A new sweep, or with resume=True the interrupted sweep <storage>/<name>; resume="auto"
    continues that sweep when it exists and starts it otherwise. samples, max_concurrent and
    study_url: None means the default for a new sweep, the stored value on resume (where any
    other value is refused)."""
    from raypose.cluster.driver import preflight

    space = load_space(space_path)
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    cfg.storage.name = name
    # every trial's config must be valid: check the base and the space's extremes up front
    space.check_against(cfg)
    if not space.is_grid and not (cfg.data.val_subjects or cfg.data.val_sequence_every > 0):
        raise ConfigError(
            f"{space_path} samples settings and ranks them on validation, but data.val_subjects "
            "is [] and data.val_sequence_every 0, so nothing is held out to rank on; hold out "
            "sequences (--set data.val_sequence_every=N) or subjects, or use a grid space "
            "(search_spaces/per_action.yaml)"
        )
    if space.is_grid and study_url is not None:
        raise ConfigError(f"--study-db: {space_path} is a grid sweep, which has no Optuna study")
    if study_url is not None:
        check_study_db(study_url)  # before Optuna adds its tables to someone else's database
    # a resume makes nothing: a refused one leaves storage as it was
    given = storage.parse(cfg.storage.uri)
    if resume is True and given.scheme == "file" and not Path(given.path).is_dir():
        raise ConfigError(
            f"--resume: no sweep named {name!r} under {given.uri} (the folder does not exist)"
        )
    loc = preflight(cfg, create=resume is not True)
    exp = loc.join(name)
    if resume == "auto":
        # a RayJob's retries run the same entrypoint: the first attempt starts the sweep, later
        # ones continue it
        resume = experiment_exists(exp)
        print(
            f"[raypose] --resume auto: {'continuing the' if resume else 'no'} sweep {name!r} "
            f"under {loc.uri}{'' if resume else '; starting it'}",
            flush=True,
        )
    if resume and not experiment_exists(exp):
        raise ConfigError(f"--resume: no sweep named {name!r} under {loc.uri}")
    if not resume and experiment_exists(exp):
        raise ConfigError(
            f"a sweep named {name!r} already exists under {loc.uri}; "
            "pass --resume to continue it or choose another --name"
        )
    grid = None
    if space.is_grid:
        from raypose.cluster.driver import prepare_data

        grid = space.grid(prepare_data(cfg)["info"]["actions"])
        combinations = math.prod(len(values) for values in grid.values())
        if samples is not None and samples != combinations:
            raise ConfigError(
                f"--samples {samples}: {space_path} is a grid of {combinations} combinations, "
                "each run once; drop --samples"
            )
        samples = None if resume else combinations
    if resume and grid:
        stored = resume_settings(exp, cfg, space_path, samples, max_concurrent, None)
        samples, max_concurrent, study_url = stored["samples"], stored["max_concurrent"], None
        seal.verify_experiment(
            storage.filesystem(exp), exp.path, lambda p: f"s3://{p}" if loc.scheme == "s3" else p
        )
    elif resume:
        stored = resume_settings(exp, cfg, space_path, samples, max_concurrent, study_url)
        samples, max_concurrent = stored["samples"], stored["max_concurrent"]
        study_url = stored["study_url"] or study_url or default_study_url(loc, name)
        here = default_study_url(loc, name)
        db = sqlite_path(study_url)
        if study_url != here and loc.scheme != "file" and db is not None and not _creatable(db):
            # the SQLite cache of the machine that started the sweep does not exist here (another
            # home, a fresh pod): this machine's cache, seeded from the copy in storage, holds it
            print(
                f"[raypose] the sweep's Optuna study {study_url} cannot be created here; "
                f"using {here}, restored from {study_copy(exp).uri}",
                flush=True,
            )
            study_url = here
        check_study_db(study_url)
        seed_study(study_url, exp)
        # nothing Tune would unpickle is read unless this machine's key sealed it
        seal.verify_experiment(
            storage.filesystem(exp), exp.path, lambda p: f"s3://{p}" if loc.scheme == "s3" else p
        )
        os.environ[STUDY_URL_ENV] = study_url  # read by the restored searcher (make_searcher)
    elif not grid:
        samples = samples or DEFAULT_SAMPLES
        study_url = study_url or default_study_url(loc, name)
        check_no_stale_study(study_url, name)
    # one sweep of this name at a time, refused before Ray starts (released in the finally below)
    lock = runlock.hold(loc, name, "raypose tune")
    lock.__enter__()
    try:
        return _run_sweep_locked(
            cfg,
            space,
            space_path,
            name,
            loc,
            exp,
            samples,
            max_concurrent,
            resume,
            study_url,
            address,
            grid,
        )
    finally:
        lock.__exit__(None, None, None)


def _run_sweep_locked(
    cfg,
    space,
    space_path,
    name,
    loc,
    exp,
    samples,
    max_concurrent,
    resume,
    study_url,
    address,
    grid,
) -> dict:
    from raypose.cluster.driver import check_resources, check_state_api, init_ray, run_interruptible

    init_ray(address, command="tune")
    check_state_api(sweep=True)
    flags = (
        "--workers-per-trial and --gpus-per-worker" if cfg.scaling.gpu else "--workers-per-trial"
    )
    capacity = check_resources(cfg, flags, what="one trial")
    from raypose.train.run import check_gpu_packing

    # a GPU share below 1: k trials on one GPU must fit its memory, refused before any trial
    check_gpu_packing(cfg, flags)
    from raypose.cluster import nodes

    nodes.check_nodes(cfg, loc)  # every node that can host a worker sees the data and the storage
    # trials at a time: what the cluster can scale to, not only the nodes up now (an autoscaling
    # cluster's GPU nodes start at zero); the nodes up now when the maximum is unknown
    slots = (capacity.now if capacity.most is None else capacity.most) // cfg.scaling.workers
    if resume:
        print(
            f"[raypose] resuming sweep {name} under {loc.uri}: keeps its "
            f"{samples or 'saved number of'} trials, {max_concurrent or 'its saved number'} at a "
            f"time, search space, base config and Optuna study {study_url}; applies "
            f"data.path, storage.* and scaling.* ({cfg.scaling.workers} worker(s) per trial) to "
            "trials that start or restart",
            flush=True,
        )
        max_concurrent = max_concurrent or max(1, int(slots))  # for the summary's time share
    else:
        if max_concurrent is None:
            max_concurrent = max(1, int(slots))
        searched = (
            "a grid over "
            + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in grid.items())
            + " (every combination once, every epoch)"
            if grid
            else f"Optuna study {study_url}"
        )
        print(
            f"[raypose] sweep {name}: {samples} trials of {cfg.schedule.epochs} epochs, "
            f"{cfg.scaling.workers} worker(s) each, {max_concurrent} at a time; "
            f"space {space_path}; {searched}",
            flush=True,
        )
        write_sweep_record(
            exp, sweep_record(cfg, space_path, samples, max_concurrent, study_url, grid)
        )
    paper_point, paper_missing = paper_defaults_point(space, cfg)
    start = time.perf_counter()
    # Optuna's and Tune's own lines go to the log file; Tune would copy AWS credentials from this
    # process's environment into every trial's runtime_env, which Ray logs

    def stopped() -> str:
        from raypose.cluster.driver import remove_unrecorded

        fs = storage.filesystem(exp)
        runs = exp.join("train")
        removed = 0
        if fs.exists(runs.path):
            for path in fs.ls(runs.path, detail=False):
                removed += len(remove_unrecorded(runs.join(path.rstrip("/").rsplit("/", 1)[-1])))
        db = sqlite_path(study_url) if study_url else None
        if loc.scheme != "file" and db is not None and db.exists():
            copy_study(db, study_copy(exp))  # the study as the stop left it
        tidied = f"; removed {removed} unrecorded checkpoint folder(s)" if removed else ""
        return (
            f"sweep {name} stopped{tidied}; `raypose tune` with the same flags and --resume "
            "continues it (finished trials are kept, the others resume from their last "
            "recorded checkpoint)"
        )

    with console.quiet(), storage.credentials_out_of_environment():
        tuner = build_tuner(
            cfg, space, name, samples, max_concurrent, study_url, resume, paper_point, grid
        )
        result_grid = run_interruptible(tuner.fit, stopped)
    wall = time.perf_counter() - start
    rows, text, share = summarise(result_grid, wall, max_concurrent, space.names, paper_point)
    print(text, flush=True)
    if grid is not None:
        return finish_grid(cfg, space, exp, loc, rows, grid, wall)
    finished = [r for r in rows if r["best_val_mpjpe"] is not None]
    if not finished:
        raise RuntimeError(
            f"sweep {name}: no trial reached a validation MPJPE; see the trial errors above"
        )
    best = existing_checkpoint(loc, finished)
    paper = next((r for r in rows if r["is_paper_defaults"]), None)
    baselines = [r["val_mean_pose_mpjpe"] for r in rows if r["val_mean_pose_mpjpe"] is not None]
    best_json = {
        "experiment": exp.uri,
        "trial_id": best["trial_id"],
        "params": best["params"],
        "config": space.apply(best["params"], cfg).to_dict(),
        "metric": "val_mpjpe",  # the best value a trial reached (METRIC is its running minimum)
        "mode": MODE,
        "value": best["best_val_mpjpe"],
        "val_mean_pose_mpjpe": baselines[0] if baselines else None,
        "paper_defaults": None
        if paper is None
        else {
            "trial_id": paper["trial_id"],
            "params": paper["params"],
            "value": paper["best_val_mpjpe"],
            "state": paper["state"],
            "not_searched": paper_missing,
        },
        "epoch": best["best_epoch"],
        "checkpoint": checkpoint_uri(loc, best["checkpoint_path"]),
        "study": {"url": study_url, "name": name, "copy": study_copy(exp).uri},
        "trials": rows,
        "wall_seconds": wall,
        "share_in_epochs": share,
    }
    best_loc = write_best(exp, best_json)
    versus = ""
    if paper is not None and paper["best_val_mpjpe"]:
        versus += (
            f", {best['best_val_mpjpe'] / paper['best_val_mpjpe']:.2f}x the paper settings' "
            f"{paper['best_val_mpjpe']:.1f} mm"
        )
    if baselines:
        versus += (
            f", {best['best_val_mpjpe'] / baselines[0]:.2f}x the mean pose's {baselines[0]:.1f} mm"
        )
    print(
        f"[raypose] best trial {best['trial_id']}: val_mpjpe {best['best_val_mpjpe']:.1f} mm at epoch "
        f"{best['best_epoch']}{versus}; {best_loc.uri}",
        flush=True,
    )
    return best_json


def validation_over_seeds(trials: list, seed_names=("seed",)) -> list:
    """The grid's trials that differ only in their seed, pooled: mean and sample standard
    deviation over seeds of each trial's best validation MPJPE (none without validation)."""
    groups: dict = {}
    for trial in trials:
        if trial["best_val_mpjpe"] is None:
            continue
        params = {k: v for k, v in trial["params"].items() if k not in seed_names}
        groups.setdefault(repr(sorted(params.items())), (params, []))[1].append(
            trial["best_val_mpjpe"]
        )
    return [
        {
            "params": params,
            "runs": len(values),
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
        }
        for params, values in groups.values()
    ]


def finish_grid(cfg, space, exp, loc, rows, grid, wall) -> dict:
    """A grid sweep's end: grid.json lists every trial with the checkpoint that stands for it
    (its best on validation, or its last without validation); nothing is chosen among them."""
    trials = []
    for row in rows:
        chosen = row["checkpoint_path"] or row["last_checkpoint_path"]
        trials.append(
            {
                "trial_id": row["trial_id"],
                "params": row["params"],
                "state": row["state"],
                "epochs": row["epochs"],
                "best_val_mpjpe": row["best_val_mpjpe"],
                "checkpoint": checkpoint_uri(loc, chosen),
                "checkpoint_is": (
                    "best on validation" if row["checkpoint_path"] else "the last epoch's"
                ),
                "error": row["error"],
            }
        )
    with_checkpoint = [t for t in trials if t["checkpoint"]]
    if not with_checkpoint:
        raise RuntimeError(
            f"grid sweep {exp.uri}: no trial left a checkpoint with a regression head; see the "
            "trial errors above"
        )
    record = {
        "experiment": exp.uri,
        "kind": "grid",
        "grid": grid,
        "fixed": space.fixed(),
        "config": cfg.to_dict(),
        "trials": trials,
        "wall_seconds": wall,
    }
    record["validation"] = validation_over_seeds(trials)
    where = write_grid(exp, record)
    for group in record["validation"]:
        setting = " ".join(f"{k}={v}" for k, v in group["params"].items()) or "the base config"
        spread = (
            "" if group["sd"] is None else f" +- {group['sd']:.1f} (sd over {group['runs']} seeds)"
        )
        print(
            f"[raypose] {setting}: best validation MPJPE {group['mean']:.1f} mm{spread}",
            flush=True,
        )
    print(
        f"[raypose] grid sweep: {len(with_checkpoint)} of {len(trials)} trials left a checkpoint; "
        f"{where.uri} lists them; `raypose evaluate {exp.uri}` tests each",
        flush=True,
    )
    return record


# ----------------------------------------------------------------------------------------------
# Command line: raypose tune / jobs/tune.py


def add_arguments(parser) -> None:
    parser.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    parser.add_argument("--data", required=True, help="directory with train.h5")
    parser.add_argument("--storage", required=True, help="a path, file://... or s3://bucket/prefix")
    parser.add_argument("--name", required=True, help="the sweep's name under --storage")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"number of trials (default {DEFAULT_SAMPLES}; a resume keeps the sweep's own)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial")
    parser.add_argument(
        "--workers-per-trial",
        default=None,
        help="Ray Train workers per trial: N, or MIN:MAX for elastic trials",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=gpus_per_worker_arg,
        default=None,
        metavar="G",
        help="GPUs per Ray Train worker: 0 (default), 1, or a share 1/k of one GPU (0.5, 0.25, "
        "0.125, 0.0625) so that k trials of one worker each share a GPU",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at a time (default: as many as the cluster's CPUs/GPUs fit; "
        "a resume keeps the sweep's own)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default="no",
        choices=["yes", "auto", "no"],
        help="continue an interrupted sweep; `--resume auto` continues it when it "
        "exists and starts it otherwise (for job retries)",
    )
    parser.add_argument(
        "--study-db",
        default=None,
        help="SQLAlchemy URL of the Optuna study (default: SQLite in the experiment "
        "folder, or for S3 a local cache of this experiment; a resume keeps the sweep's own)",
    )
    parser.add_argument("--config", help="YAML file with base config overrides")
    parser.add_argument(
        "--settings-of",
        metavar="EXPERIMENT",
        default=None,
        help="start every trial from the best trial's searched values in that finished sweep's "
        "best.json (a path or s3://...), e.g. to retrain it with search_spaces/seeds.yaml; "
        "--set still overrides them",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local instance)")


def best_settings(uri: str, flag: str = "--settings-of") -> dict:
    """The searched values of a finished sweep's best trial: {'params', 'trial_id', 'best'}
    where best is best.json's location. One ConfigError naming the flag when uri is no finished
    sweep (a grid sweep, a checkpoint, a sweep still running) or its best.json holds no params."""
    from raypose.storage.experiment import BEST_FILE, EvaluationError, resolve

    where = f"{flag} {uri}"
    try:
        target = resolve(uri)
    except EvaluationError as e:
        raise ConfigError(f"{where}: {e}") from None
    if target["kind"] != "experiment":
        what = {"grid": "a grid sweep, which chooses no best trial", "checkpoint": "a checkpoint"}
        raise ConfigError(
            f"{where}: is {what[target['kind']]}; give the folder of a finished sampled sweep "
            "(it holds best.json)"
        )
    best_loc = target["experiment"].join(BEST_FILE)
    params = target["best"].get("params")  # resolve() has read best.json as a mapping
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: {best_loc.uri} has no 'params' mapping of searched values")
    return {"params": params, "trial_id": target["best"].get("trial_id"), "best": best_loc.uri}


def sweep_config(args) -> tuple:
    """The sweep's base config from its flags, validated: defaults <- --config <- --settings-of
    <- --set <- --data, --storage, --epochs and the scaling flags. Returns (cfg, sources)."""
    sources = {}
    cfg = load_config(args.config, (), sources=sources)
    if args.settings_of:
        found = best_settings(args.settings_of)
        for key, value in found["params"].items():
            where = f"--settings-of {args.settings_of} ({found['best']}: {key})"
            set_value(cfg, key, value, where)
            sources[resolve_key(cfg, key, where)] = where
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in found["params"].items()
        )
        print(
            f"[raypose] settings of trial {found['trial_id']} ({found['best']}): {shown}",
            flush=True,
        )
    apply_overrides(cfg, args.overrides, sources=sources)
    set_value(cfg, "data.path", args.data, "--data")
    set_value(cfg, "storage.uri", args.storage, "--storage")
    sources.update({"data.path": "--data", "storage.uri": "--storage"})
    if args.epochs is not None:
        set_value(cfg, "schedule.epochs", args.epochs, "--epochs")
        sources["schedule.epochs"] = "--epochs"
    if args.workers_per_trial is not None:
        set_workers(cfg, args.workers_per_trial, "--workers-per-trial", sources)
    if args.gpus_per_worker is None:
        set_value(cfg, "scaling.gpu", False, "--gpus-per-worker")
    else:  # 0, 1 or a share 1/k (scaling.gpu_share; 2 CPUs per worker under a share)
        set_gpus_per_worker(cfg, args.gpus_per_worker, "--gpus-per-worker", sources)
    return cfg.validate(sources), sources


def run(args) -> int:
    # raypose's errors reach raypose.cli.main, which prints them as one line and exits 2
    validate.check_name(args.name, "--name")
    validate.positive(args.samples, "--samples")
    validate.positive(args.max_concurrent, "--max-concurrent")
    cfg, _ = sweep_config(args)
    storage.data_location(args.data, "--data")
    storage.storage_location(args.storage, "--storage")
    validate.ray_address_from(args.address)  # before any data is read or storage made
    run_sweep(
        cfg,
        args.space,
        args.name,
        args.samples,
        args.max_concurrent,
        {"yes": True, "no": False, "auto": "auto"}[args.resume],
        args.study_db,
        args.address,
    )
    return 0
