"""Ray Tune's searcher and scheduler for a raypose sweep, on Ray's and Optuna's public APIs only
(Ray 2.52 to 2.60, Optuna >= 4).

StudySearcher drives an optuna.Study itself: a seeded multivariate TPE on the define-by-run space
(SearchSpace.define_by_run), asked once per Tune trial; best_val_mpjpe of every epoch with a
regression head as an intermediate value (step = epoch); COMPLETE with that value for a trial
that ran every epoch, PRUNED for one ASHA stopped (Optuna takes its last intermediate value as
its value), FAIL for an error. Its saved state is JSON, never a pickle.

RegressionStageASHA is ASHA on the `epoch` axis that never judges a result without a regression
head and never stops the paper-settings trial.

Only the sweep's driver imports this module (raypose.search.sweep); it imports Ray Tune and Optuna.
"""

import json
import math
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler  # Ray: ASHA

from raypose.cluster.ray_internals import Searcher

# A resumed sweep's Optuna study on this machine: Tune restores the searcher as pickled by the
# driver that started the sweep, with that machine's study URL; the searcher re-opens the study
# here instead (StudySearcher.restore and its unpickling)
STUDY_URL_ENV = "RAYPOSE_STUDY_URL"
METRIC = "best_val_mpjpe"  # the best val_mpjpe a trial has reached so far, with a regression head
MODE = "min"
STATE_FORMAT = "raypose.search.searcher/1"  # marks the JSON that StudySearcher.save writes


def judged(result: dict) -> bool:
    """Whether a result can be compared with others: only with a regression head."""
    return bool(result.get("has_regression_head", True)) and result.get(METRIC) is not None


def trial_state(result: dict | None, error: bool) -> str:
    """COMPLETE (ran every planned epoch), PRUNED (stopped early by ASHA) or ERROR."""
    if error:
        return "ERROR"
    if result and result.get("epoch", 0) >= result.get("epochs_planned", 0) and judged(result):
        return "COMPLETE"
    return "PRUNED"


def make_scheduler(
    max_epochs: int,
    grace_period: int = 1,
    reduction_factor: float = 2,
    reference: dict | None = None,
):
    """reference: the paper-settings point; the first trial whose config holds it is never
    stopped (its results still count at every rung), so every sweep compares its best trial with
    the paper's settings trained as long."""
    return RegressionStageASHA(
        reference,
        time_attr="epoch",
        metric=METRIC,
        mode=MODE,
        max_t=max_epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def make_searcher(
    space,
    seed: int,
    study_url: str,
    study_name: str,
    points_to_evaluate=(),
    concurrent: bool = False,
    samples: int = 8,
):
    """A StudySearcher on the study `study_name` at `study_url` (created unless it exists): a
    seeded multivariate TPE (constant liar when trials run at once, so concurrent trials do not
    all sample the same region) on a define-by-run space. points_to_evaluate are the study's
    first trials when the study is new."""
    return StudySearcher(
        space,
        seed,
        study_url,
        study_name,
        points_to_evaluate=points_to_evaluate,
        concurrent=concurrent,
        samples=samples,
    )


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
OPTUNA_TABLES = ("studies", "version_info")  # tables every Optuna RDB storage holds


def check_study_db(study_url: str) -> None:
    """--study-db, before Optuna opens it (Optuna adds its tables to any SQLite file it is given):
    a SQLite file that exists must be empty or an Optuna database. Refuses, with a ConfigError
    naming --study-db, a file that is not SQLite, a folder, and a SQLite database of something
    else (tables, none of them Optuna's). A file that does not exist yet, an empty file and
    non-SQLite URLs (PostgreSQL, MySQL: the server says) pass. Reads the file only."""
    import sqlite3

    from raypose.config import ConfigError
    from raypose.validate import clipped

    db = sqlite_path(study_url)
    if db is None or not db.exists():
        return
    where = f"--study-db {clipped(study_url, 240)}"  # a path: shown whole unless absurd
    if db.is_dir():
        raise ConfigError(
            f"{where}: is a folder, expected an Optuna SQLite file "
            "(or a path that does not exist yet)"
        )
    try:
        with open(db, "rb") as f:
            header = f.read(100)  # the database header
    except OSError as e:
        raise ConfigError(
            f"{where}: the file cannot be read ({e.strerror or type(e).__name__})"
        ) from None
    if not header:
        return  # an empty file: SQLite takes it for an empty database
    if not header.startswith(SQLITE_HEADER):
        raise ConfigError(
            f"{where}: the file is not a SQLite database; give an Optuna "
            "SQLite file or a path that does not exist yet"
        )
    # read without writing: immutable=1 makes SQLite create no -shm/-wal files beside it, except
    # for a WAL database whose -wal file holds changes not yet in the file itself
    live_wal = len(header) > 18 and header[18] == 2 and Path(f"{db}-wal").exists()
    options = "mode=ro" if live_wal else "mode=ro&immutable=1"
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?{options}", uri=True)
        try:
            tables = sorted(
                row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            )
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise ConfigError(
            f"{where}: the file is not a readable SQLite database ({clipped(e, 120)})"
        ) from None
    if not tables or all(t in tables for t in OPTUNA_TABLES):
        return
    raise ConfigError(
        f"{where}: the file is a SQLite database of something else (tables "
        f"{clipped(', '.join(tables), 120)}), not an Optuna study database; give "
        "an Optuna SQLite file or a path that does not exist yet"
    )


def read_state(path: str) -> dict:
    """The JSON StudySearcher.save wrote; ValueError for anything else (read as text only)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = json.loads(raw.decode("utf-8"))
    except ValueError:  # not UTF-8 or not JSON (a pickle is neither)
        raise ValueError(f"{path}: not a raypose searcher state (not JSON)") from None

    def strings(items):
        return all(isinstance(s, str) for s in items)

    def ints(items):
        return all(type(i) is int for i in items)  # not bool

    ok = (
        isinstance(state, dict)
        and state.get("format") == STATE_FORMAT
        and isinstance(state.get("study_url"), str)
        and isinstance(state.get("study_name"), str)
        and isinstance(state.get("trials"), dict)
        and ints(state["trials"].values())
        and isinstance(state.get("reported"), dict)
        and all(isinstance(v, list) and ints(v) for v in state["reported"].values())
        and isinstance(state.get("completed"), list)
        and strings(state["completed"])
    )
    if not ok:
        raise ValueError(f"{path}: not a raypose searcher state ({STATE_FORMAT} JSON expected)")
    return state


def _plain(value) -> bool:
    """Whether a Tune config value is a constant (no tune.* domain, no grid_search)."""
    if isinstance(value, dict):
        return "grid_search" not in value and all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


class RegressionStageASHA(AsyncHyperBandScheduler):
    """ASHA on best_val_mpjpe over epochs; results without a regression head (the detection
    stage of a pretrain trial) are never judged. ASHA judges a trial at the highest rung it has
    passed and not yet been recorded at, so a pretrain trial whose head appears at epoch 4 is
    first compared at rung 4, with the joint trials' results at epoch 4."""

    def __init__(self, reference: dict | None = None, **kwargs):
        self.reference = dict(reference or {})
        self.reference_trial_id = None
        super().__init__(**kwargs)

    def is_reference(self, trial) -> bool:
        if not self.reference:
            return False
        if self.reference_trial_id is None and all(
            (trial.config or {}).get(k) == v for k, v in self.reference.items()
        ):
            self.reference_trial_id = trial.trial_id
        return trial.trial_id == self.reference_trial_id

    def on_trial_result(self, tune_controller, trial, result):
        if not judged(result):
            return self.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung
        return self.CONTINUE if self.is_reference(trial) else action

    def on_trial_complete(self, tune_controller, trial, result):
        if result and not judged(result):
            # ASHA's own on_trial_complete would record it at a rung; forget the trial
            try:
                self.on_trial_remove(tune_controller, trial)
            except KeyError:  # Ray's on_trial_remove has no default for an unknown trial
                pass
            return
        super().on_trial_complete(tune_controller, trial, result)


class StudySearcher(Searcher):
    """Tells the study what ASHA and best.json see (see the module's docstring).

    Its own bookkeeping: `trials` (Tune trial id -> Optuna trial number), `reported` (epochs
    told per trial) and `completed` (trial ids told their end). Pickled (Tune's tuner.pkl),
    it holds the study URL, not the study: the study is re-opened at first use, at
    STUDY_URL_ENV when set, else at that URL. save/restore write and read that state as JSON.
    """

    def __init__(
        self,
        space,
        seed: int,
        study_url: str,
        study_name: str,
        points_to_evaluate=(),
        concurrent: bool = False,
        samples: int = 8,
    ):
        super().__init__(metric=METRIC, mode=MODE)
        self.space = space
        self.seed, self.concurrent, self.samples = seed, concurrent, samples
        self.study_url, self.study_name = study_url, study_name
        self.trials = {}
        self.reported = {}
        self.completed = set()
        self.study = self.storage = None
        self.live = {}  # trial id -> optuna Trial; re-made from its number after a restore
        self.open(create=True, points=[dict(p) for p in points_to_evaluate])

    # -- the study

    def sampler(self, offset: int):
        return optuna.samplers.TPESampler(
            seed=None if self.seed is None else self.seed + offset,
            multivariate=True,
            group=True,
            constant_liar=self.concurrent,
            # TPE's default of 10 random trials first would leave a small sweep with no
            # model-based trial at all
            n_startup_trials=min(10, max(3, self.samples // 3)),
        )

    def open(self, create: bool, points=()) -> None:
        url = self.study_url if create else os.environ.get(STUDY_URL_ENV) or self.study_url
        db = sqlite_path(url)
        if db is not None and create:
            db.parent.mkdir(parents=True, exist_ok=True)
        elif db is not None and not db.exists():
            # SQLite would create an empty database there: the sweep's trials would be lost
            raise FileNotFoundError(
                f"the sweep's Optuna study {url} is not on this machine; set {STUDY_URL_ENV} "
                "to the URL of its copy here"
            )
        storage = optuna.storages.RDBStorage(url)
        common = dict(
            study_name=self.study_name, storage=storage, pruner=optuna.pruners.NopPruner()
        )  # ASHA stops trials, not Optuna
        if create:
            study = optuna.create_study(
                direction="minimize", load_if_exists=True, sampler=self.sampler(0), **common
            )
            if not study.get_trials(deepcopy=False):  # the points go first, and only once
                for point in points:
                    study.enqueue_trial(point)
        else:
            study = optuna.load_study(sampler=self.sampler(0), **common)
        # the sampler's random state is not saved: one seeded as at the start would draw
        # the same values again, so it is seeded past the trials already asked
        asked = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
        if asked:
            study = optuna.load_study(sampler=self.sampler(asked), **common)
        self.study, self.storage, self.study_url, self.live = study, storage, url, {}

    def opened(self):
        if self.study is None:
            self.open(create=False)
        return self.study

    def trial_of(self, trial_id: str):
        """The optuna Trial of a Tune trial, for report()."""
        if trial_id not in self.live:
            study = self.opened()
            db_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.storage.get_study_id_from_name(self.study_name), self.trials[trial_id]
            )
            self.live[trial_id] = optuna.trial.Trial(study, db_id)
        return self.live[trial_id]

    # -- Searcher

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """The space is the searcher's own: a Tune config may only hold constants."""
        return metric in (None, METRIC) and mode in (None, MODE) and _plain(config or {})

    def suggest(self, trial_id: str) -> dict:
        trial = self.opened().ask()
        fixed = self.space.define_by_run(trial)
        self.trials[trial_id] = trial.number
        self.live[trial_id] = trial
        return {**trial.params, **(fixed or {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.completed or trial_id not in self.trials or not judged(result):
            return
        epoch = int(result["epoch"])
        reported = self.reported.setdefault(trial_id, set())
        if epoch not in reported:
            self.trial_of(trial_id).report(float(result[METRIC]), epoch)
            reported.add(epoch)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self.completed or trial_id not in self.trials:
            return
        state = trial_state(result, error)
        if result and not error and judged(result):
            # Tune hands the last result (the one ASHA stopped on, or the final one) only here
            self.on_trial_result(trial_id, result)
        study, number = self.opened(), self.trials[trial_id]
        try:
            value = float(result[METRIC]) if state == "COMPLETE" else math.nan
            if not math.isnan(value):
                study.tell(number, value, state=TrialState.COMPLETE, skip_if_finished=True)
            else:  # PRUNED takes its last intermediate value; Optuna refuses a NaN value
                study.tell(
                    number,
                    state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL,
                    skip_if_finished=True,
                )
        finally:
            self.completed.add(trial_id)
            self.live.pop(trial_id, None)

    # -- saved state: JSON with Tune's experiment state, the study URL in pickles

    def save(self, checkpoint_path: str) -> None:
        state = {
            "format": STATE_FORMAT,
            "study_url": self.study_url,
            "study_name": self.study_name,
            "trials": self.trials,
            "reported": {t: sorted(e) for t, e in self.reported.items()},
            "completed": sorted(self.completed),
        }
        with open(checkpoint_path, "w") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        state = read_state(checkpoint_path)
        self.study_url, self.study_name = state["study_url"], state["study_name"]
        self.trials = dict(state["trials"])
        self.reported = {t: set(e) for t, e in state["reported"].items()}
        self.completed = set(state["completed"])
        self.study = self.storage = None
        self.opened()  # fails here, at the resume, if the study cannot be found

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(study=None, storage=None, live={})  # re-opened from the URL
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
