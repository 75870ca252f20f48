"""raypose.search.searcher: ASHA and the Optuna study searcher inside a real local Tune run on scripted
results, and the searcher's saved state (JSON, never a pickle) re-opening the study elsewhere."""

import json
import pickle

import pytest

from raypose.search.searcher import STUDY_URL_ENV, make_scheduler, make_searcher


def scripted_trial(config):
    """A Tune function that reports a fixed script of results (no training), to test how the
    scheduler judges them. Each step is (has a regression head, val_mpjpe); best_val_mpjpe is the
    running minimum over steps with a head, and the mean-pose baseline (5000 mm here) without."""
    from ray import tune

    scripts = {
        # joint training, improving
        "good": [(True, v) for v in (100.0, 90.0, 80.0, 70.0, 60.0, 50.0)],
        # pretrain: three detection epochs with no regression head (val_mpjpe is the mean-pose
        # baseline, far worse than anything else), then a regression stage better than "good"
        "pretrain_good": [(False, 5000.0)] * 3 + [(True, 65.0), (True, 60.0), (True, 45.0)],
        # the same, with a regression stage clearly worse than "good" at equal epochs
        "pretrain_bad": [(False, 5000.0)] * 3 + [(True, 900.0), (True, 890.0), (True, 880.0)],
        # joint training, clearly bad
        "bad": [(True, v) for v in (1000.0, 990.0, 980.0, 970.0, 960.0, 950.0)],
        "worse": [(True, v) for v in (2000.0, 1990.0, 1980.0, 1970.0, 1960.0, 1950.0)],
    }
    best = None
    script = scripts[config["kind"]]
    for epoch, (has_head, value) in enumerate(script, start=1):
        if has_head:
            best = value if best is None else min(best, value)
        tune.report(
            {
                "epoch": epoch,
                "epochs_planned": len(script),
                "has_regression_head": has_head,
                "val_mpjpe": value,
                "best_val_mpjpe": best if has_head else 5000.0,
            }
        )


def lr_scripted_trial(config):
    """Scripted results whose quality depends on the learning rate only: best at lr = 3e-4 (the
    base config's default, which the paper-settings trial takes); pretrain trials report two
    detection epochs without a head first."""
    import math

    from ray import tune

    distance = abs(math.log10(config["lr"] / 3e-4))  # 0 for the paper-settings trial
    pretrain = config.get("schedule") == "pretrain"
    best = None
    for epoch in range(1, 5):
        has_head = not (pretrain and epoch <= 2)
        value = (100.0 + 400.0 * distance) * (1.0 - 0.1 * epoch) if has_head else 5000.0
        if has_head:
            best = value if best is None else min(best, value)
        tune.report(
            {
                "epoch": epoch,
                "epochs_planned": 4,
                "has_regression_head": has_head,
                "val_mpjpe": value,
                "best_val_mpjpe": best if has_head else 5000.0,
            }
        )


def lr_space():
    from raypose.search.space import parse_space

    return parse_space(
        {"parameters": {"lr": {"distribution": "loguniform", "low": 1.0e-5, "high": 1.0e-2}}},
        "test space",
    )


def test_asha_compares_at_equal_epochs_and_never_judges_a_detection_stage(ray_local, tmp_path):
    """Rungs at epochs 1, 2 and 4. A bad joint trial stops at rung 1. Pretrain trials report
    5000 mm for three detection epochs and are not stopped there; they are first judged at rung 4
    against the joint trial's epoch 4: the good one runs to the end, the bad one stops at 4."""
    from ray import tune

    tuner = tune.Tuner(
        scripted_trial,
        param_space={"kind": tune.grid_search(["good", "pretrain_good", "pretrain_bad", "bad"])},
        tune_config=tune.TuneConfig(
            scheduler=make_scheduler(max_epochs=6), max_concurrent_trials=1
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    grid = tuner.fit()
    reported = {r.config["kind"]: len(r.metrics_dataframe) for r in grid}
    assert reported == {"good": 6, "pretrain_good": 6, "pretrain_bad": 4, "bad": 1}


def test_asha_never_stops_the_paper_settings_trial(ray_local, tmp_path):
    """The reference (paper-settings) trial runs every epoch even when it is bad ("bad" stops at
    rung 1 in the test above), and its results still count: "worse" is cut at rung 1."""
    from ray import tune

    tuner = tune.Tuner(
        scripted_trial,
        param_space={"kind": tune.grid_search(["good", "bad", "worse"])},
        tune_config=tune.TuneConfig(
            scheduler=make_scheduler(max_epochs=6, reference={"kind": "bad"}),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha_ref", verbose=0),
    )
    grid = tuner.fit()
    reported = {r.config["kind"]: len(r.metrics_dataframe) for r in grid}
    assert reported == {"good": 6, "bad": 6, "worse": 1}


def test_optuna_records_paper_trial_pruned_trials_and_no_detection_epochs(
    ray_local, tmp_path, monkeypatch
):
    """The study searcher and ASHA inside Tune, on scripted results: the first trial is the
    enqueued paper settings; trials ASHA stops are PRUNED with their last best_val_mpjpe as
    value; completed ones carry their final best; no detection epoch reaches the study."""
    import optuna
    from ray import tune

    from raypose.search.space import parse_space

    space = parse_space(
        {
            "parameters": {
                "schedule": {"distribution": "categorical", "choices": ["joint", "pretrain"]},
                "lambda": {
                    "distribution": "loguniform",
                    "low": 1.0e-5,
                    "high": 1.0,
                    "condition": {"schedule": "joint"},
                },
                "lr": {"distribution": "loguniform", "low": 1.0e-5, "high": 1.0e-2},
            }
        },
        "test space",
    )
    point = {"schedule": "joint", "lambda": 1.0, "lr": 3e-4}  # tune.paper_defaults_point's
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tuner = tune.Tuner(
        lr_scripted_trial,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(
                space, 0, url, "scripted", points_to_evaluate=[point], samples=6
            ),
            scheduler=make_scheduler(max_epochs=4),
            num_samples=6,
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="optuna", verbose=0),
    )
    grid = tuner.fit()
    study = optuna.load_study(study_name="scripted", storage=url)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 6
    paper = trials[0]
    assert paper.params == point and paper.state.name == "COMPLETE"
    assert paper.value == pytest.approx(100.0 * 0.6)  # its best, at epoch 4
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "PRUNED" in states
    for t in trials:
        steps = sorted(t.intermediate_values)
        if t.params["schedule"] == "pretrain":
            assert steps and steps[0] == 3  # epochs 1 and 2 had no regression head
        else:
            assert steps[0] == 1
        # the value is the last (best so far) intermediate value, for pruned trials too
        assert t.value == pytest.approx(t.intermediate_values[steps[-1]])
        if t.state.name == "PRUNED":
            assert steps[-1] < 4
    # every Tune trial ran the config its Optuna trial holds, and reported what the study got
    by_params = {json.dumps(t.params, sort_keys=True): t for t in trials}
    assert len(by_params) == 6
    for r in grid:
        t = by_params[json.dumps(r.config, sort_keys=True)]
        judged = r.metrics_dataframe[r.metrics_dataframe["has_regression_head"]]
        assert dict(zip(judged["epoch"], judged["best_val_mpjpe"])) == pytest.approx(
            t.intermediate_values
        )

    # Tune saved the searcher's state as JSON with the experiment, and restores it (and the
    # searcher pickled in tuner.pkl) on a resume, with the study where this machine keeps it
    exp = tmp_path / "optuna"
    saved = json.loads(max(exp.glob("searcher-state-*.pkl")).read_text())
    assert sorted(saved["trials"].values()) == list(range(6)) and len(saved["completed"]) == 6
    moved = tmp_path / "elsewhere" / "optuna.db"
    moved.parent.mkdir()
    (tmp_path / "optuna.db").rename(moved)
    monkeypatch.setenv(STUDY_URL_ENV, f"sqlite:///{moved}")
    again = tune.Tuner.restore(str(exp), trainable=lr_scripted_trial, resume_unfinished=True).fit()
    assert len(again) == 6 and not (tmp_path / "optuna.db").exists()
    assert len(optuna.load_study(study_name="scripted", storage=f"sqlite:///{moved}").trials) == 6


def test_searcher_state_reopens_the_study_where_this_machine_keeps_it(tmp_path, monkeypatch):
    """A sweep resumed on a machine where the starting machine's study path cannot exist: the
    searcher Tune restores (pickled in tuner.pkl, saved with the experiment state) re-opens the
    study copied to this machine, with its running trial, and tells it the trial's result."""
    import shutil

    import optuna
    from ray import cloudpickle  # what Tune pickles the searcher with

    first = tmp_path / "first-machine" / "optuna.db"
    searcher = make_searcher(lr_space(), 0, f"sqlite:///{first}", "s", samples=3)
    assert searcher.suggest("t1") is not None  # creates Optuna trial 0, still running
    searcher.on_trial_result("t1", {"epoch": 1, "best_val_mpjpe": 120.0})
    pickled = cloudpickle.dumps(searcher)  # as in tuner.pkl
    # the study's URL, not the study nor its storage engine
    assert b"first-machine" in pickled
    assert b"RDBStorage" not in pickled and b"optuna.study" not in pickled
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # as with the experiment state
    saved = json.loads((tmp_path / "searcher-state.pkl").read_text())
    assert saved["trials"] == {"t1": 0} and saved["reported"] == {"t1": [1]}
    # the fresh machine has only the copy of the study, somewhere else
    second = tmp_path / "second-machine" / "optuna.db"
    second.parent.mkdir()
    shutil.copy(first, second)
    shutil.rmtree(first.parent)
    monkeypatch.setenv(STUDY_URL_ENV, f"sqlite:///{second}")
    restored = cloudpickle.loads(pickled)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert not first.parent.exists()  # nothing was re-created at the old path
    restored.on_trial_result("t1", {"epoch": 1, "best_val_mpjpe": 999.0})  # told already
    restored.on_trial_result("t1", {"epoch": 2, "best_val_mpjpe": 110.0})
    restored.on_trial_complete("t1", {"epoch": 2, "epochs_planned": 2, "best_val_mpjpe": 110.0})
    assert not first.parent.exists()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{second}")
    assert [(t.number, t.state.name, t.value) for t in study.trials] == [(0, "COMPLETE", 110.0)]
    assert study.trials[0].intermediate_values == {1: 120.0, 2: 110.0}
    # the next trial is numbered after it, in the same study
    assert restored.suggest("t2") is not None
    assert [
        t.number for t in optuna.load_study(study_name="s", storage=f"sqlite:///{second}").trials
    ] == [0, 1]


def test_a_pruned_trial_takes_its_last_reported_value_and_an_error_fails(tmp_path):
    """Optuna records tell(PRUNED) without a value as the last intermediate value; a trial whose
    last result ASHA stopped on is reported first; an error is FAIL; detection epochs are not
    told."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(lr_space(), 0, url, "s", samples=3)
    for trial_id in ("stopped", "failed"):
        assert set(searcher.suggest(trial_id)) == {"lr"}
    searcher.on_trial_result(
        "stopped", {"epoch": 1, "has_regression_head": False, "best_val_mpjpe": 5000.0}
    )
    searcher.on_trial_result("stopped", {"epoch": 2, "best_val_mpjpe": 300.0})
    searcher.on_trial_complete(
        "stopped", {"epoch": 3, "epochs_planned": 6, "best_val_mpjpe": 250.0}
    )
    searcher.on_trial_result("failed", {"epoch": 1, "best_val_mpjpe": 400.0})
    searcher.on_trial_complete("failed", error=True)
    searcher.on_trial_complete(
        "failed", {"epoch": 6, "epochs_planned": 6, "best_val_mpjpe": 1.0}
    )  # told already: ignored
    study = optuna.load_study(study_name="s", storage=url)
    stopped, failed = sorted(study.trials, key=lambda t: t.number)
    assert (stopped.state.name, stopped.value) == ("PRUNED", 250.0)
    assert stopped.intermediate_values == {2: 300.0, 3: 250.0}
    assert (failed.state.name, failed.value) == ("FAIL", None)


class _WritesMarker:
    """Unpickled, it creates the file at path (what a malicious searcher state could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restore_never_unpickles(tmp_path):
    """A searcher state that is a pickle, or JSON of another shape, is refused with ValueError."""
    from raypose.search.searcher import StudySearcher

    searcher = make_searcher(lr_space(), 0, f"sqlite:///{tmp_path / 'optuna.db'}", "s")
    assert isinstance(searcher, StudySearcher)
    # the payload is live: unpickling it does create its file
    witness = tmp_path / "witness"
    pickle.loads(pickle.dumps(_WritesMarker(witness))).close()
    assert witness.exists()
    marker = tmp_path / "marker"
    state = tmp_path / "searcher-state.pkl"
    state.write_bytes(pickle.dumps({"state": _WritesMarker(marker)}))
    with pytest.raises(ValueError, match="not a raypose searcher state"):
        searcher.restore(str(state))
    assert not marker.exists()
    searcher.save(str(state))
    good = json.loads(state.read_text())
    for bad in (
        {**good, "trials": {"t1": "0"}},
        {**good, "completed": "t1"},
        {k: v for k, v in good.items() if k != "study_url"},
        [good],
    ):
        state.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="not a raypose searcher state"):
            searcher.restore(str(state))
    state.write_text(json.dumps(good))
    searcher.restore(str(state))  # its own state is accepted


def test_search_properties_accept_constants_only(tmp_path):
    from ray import tune

    searcher = make_searcher(lr_space(), 0, f"sqlite:///{tmp_path / 'optuna.db'}", "s")
    assert searcher.set_search_properties(None, None, {"epochs": 3, "tags": ["a"]})
    assert searcher.set_search_properties("best_val_mpjpe", "min", {"epochs": 3})
    assert not searcher.set_search_properties("val_mpjpe", "min", {"epochs": 3})
    assert not searcher.set_search_properties(None, "max", {"epochs": 3})
    assert not searcher.set_search_properties(None, None, {"lr": tune.uniform(0, 1)})
    assert not searcher.set_search_properties(None, None, {"a": {"b": tune.grid_search([1, 2])}})


def test_asha_forgets_a_trial_that_ends_without_a_regression_head():
    """A trial that ends in its detection stage (an error, a stop from outside) is never judged:
    no rung records its mean-pose result, and ASHA no longer holds it."""
    from types import SimpleNamespace

    scheduler = make_scheduler(max_epochs=4)
    trial = SimpleNamespace(trial_id="t1", config={})
    scheduler.on_trial_add(None, trial)
    result = {
        "epoch": 2,
        "epochs_planned": 4,
        "has_regression_head": False,
        "best_val_mpjpe": 5000.0,
    }
    assert scheduler.on_trial_result(None, trial, result) == scheduler.CONTINUE
    scheduler.on_trial_complete(None, trial, result)
    assert "5000" not in scheduler.debug_string()  # no rung holds it
    with pytest.raises(KeyError):  # Ray's own bookkeeping no longer has the trial
        scheduler.on_trial_remove(None, trial)


def test_the_study_is_seeded_takes_the_points_once_and_a_resume_draws_new_values(tmp_path):
    """Same seed, same first draw; the points go first in a new study only; a re-opened
    searcher (its sampler's random state is not saved) does not draw the values again."""
    from ray import cloudpickle

    def lrs(url, ids, points=()):
        searcher = make_searcher(lr_space(), 7, url, "s", points_to_evaluate=points, samples=9)
        return searcher, [searcher.suggest(i)["lr"] for i in ids]

    a, b = (f"sqlite:///{tmp_path / name / 'optuna.db'}" for name in ("a", "b"))
    _, fresh = lrs(a, ["t1", "t2", "t3"], points=[{"lr": 3e-4}])
    searcher, first = lrs(b, ["t1", "t2"], points=[{"lr": 3e-4}])
    assert first == fresh[:2] and first[0] == 3e-4  # seeded; the point first
    resumed = cloudpickle.loads(cloudpickle.dumps(searcher))
    again = resumed.suggest("t3")["lr"]
    assert again not in first and again != fresh[2]
    # a second searcher on the study, with the same points, does not enqueue them again
    _, more = lrs(b, ["t4"], points=[{"lr": 3e-4}])
    assert more[0] not in first + [again]


# ----------------------------------------------------------------------------------------------
# --study-db: an existing file must be an Optuna database (or empty) before Optuna opens it


def _files(folder) -> dict:
    """{name: bytes} of every file in folder: a check that reads must leave all of them as they were
    and add none (no -journal, -wal or -shm beside the database)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _sqlite(path, *statements):
    import sqlite3

    con = sqlite3.connect(path)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()
    return path


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_study_db_of_another_application_is_refused_and_left_alone(tmp_path, journal):
    import optuna

    from raypose.config import ConfigError
    from raypose.search.searcher import check_study_db

    db = _sqlite(
        tmp_path / "shop.db",
        f"PRAGMA journal_mode={journal}",
        "CREATE TABLE customers (id INTEGER, name TEXT)",
        "INSERT INTO customers VALUES (1, 'Ada')",
    )
    before = _files(tmp_path)
    url = f"sqlite:///{db}"
    with pytest.raises(ConfigError) as err:
        check_study_db(url)
    message = str(err.value)
    assert message.startswith(
        f"--study-db {url}: the file is a SQLite database of something else "
        "(tables customers), not an Optuna study database"
    ), message
    assert "\n" not in message
    assert _files(tmp_path) == before  # read only: not a byte changed, no file added
    # what the check prevents: Optuna opening that file adds its own tables to it
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.study.get_all_study_names(storage=url)
    assert _files(tmp_path) != before


def test_study_db_that_is_not_sqlite_is_refused(tmp_path):
    from raypose.config import ConfigError
    from raypose.search.searcher import check_study_db

    text = tmp_path / "notes.db"
    text.write_text("my notes, not a database\n")
    with pytest.raises(
        ConfigError,
        match=r"^--study-db sqlite:///\S+/notes\.db: the file is not a "
        r"SQLite database",
    ):
        check_study_db(f"sqlite:///{text}")
    # a SQLite header over a damaged file: SQLite itself refuses it
    damaged = _sqlite(tmp_path / "damaged.db", "CREATE TABLE t (x INTEGER)")
    data = bytearray(damaged.read_bytes())
    data[16:100] = b"\xff" * 84
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        ConfigError,
        match=r"^--study-db \S+/damaged\.db: the file is not a readable "
        r"SQLite database \(file is not a database\)$",
    ):
        check_study_db(f"sqlite:///{damaged}")
    with pytest.raises(ConfigError, match=r"^--study-db \S+: is a folder"):
        check_study_db(f"sqlite:///{tmp_path}")
    assert sorted(_files(tmp_path)) == ["damaged.db", "notes.db"]


def test_study_db_missing_empty_or_optuna_is_accepted(tmp_path):
    import optuna

    from raypose.search.searcher import check_study_db

    check_study_db(f"sqlite:///{tmp_path / 'new' / 'optuna.db'}")  # does not exist yet
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    check_study_db(f"sqlite:///{empty}")
    blank = _sqlite(tmp_path / "blank.db", "PRAGMA user_version = 7")  # SQLite, no tables
    assert blank.read_bytes().startswith(b"SQLite format 3\x00")
    check_study_db(f"sqlite:///{blank}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=study_url, study_name="sweep").enqueue_trial({"x": 1.0})
    check_study_db(study_url)
    check_study_db("postgresql://user@db.example/optuna")  # a server database: not a local file
    assert not (tmp_path / "new").exists()
