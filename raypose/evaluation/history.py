"""A sweep's history for the evaluation's and the report's figures: from the copy of its Optuna
study when there is one, else from best.json's trial rows."""

from pathlib import Path

from raypose import storage
from raypose.storage.experiment import trial_state


def sweep_history(best: dict, study_db: Path | None, copy: storage.Location) -> dict:
    """{'trials', 'importances', 'source', 'note'} for the sweep figures: from the Optuna study
    copy when there is one that can be read, else from best.json's trial rows."""
    import optuna
    import sqlalchemy.exc

    study_name = (best.get("study") or {}).get("name")
    if study_db is not None:
        try:
            trials, importances = study_history(study_db, study_name)
        except (
            optuna.exceptions.OptunaError,
            sqlalchemy.exc.SQLAlchemyError,
            KeyError,
            ValueError,
            RuntimeError,
        ) as e:
            note = f"the Optuna study copy {copy.uri} could not be read ({type(e).__name__})"
        else:
            note = (
                None
                if importances
                else ("parameter importances need at least 2 finished trials whose parameters vary")
            )
            return {
                "trials": trials,
                "importances": importances,
                "source": "optuna study copy",
                "note": note,
            }
    else:
        note = f"no copy of the Optuna study at {copy.uri}"
    trials = trials_from_best(best)
    if trials:
        note += "; history drawn from best.json's trial rows, parameter importances not computed"
    else:
        note += (
            " and no trial rows in best.json; sweep_history.png not drawn, parameter "
            "importances not computed"
        )
    return {
        "trials": trials,
        "importances": {},
        "source": "best.json" if trials else None,
        "note": note,
    }


def trials_from_best(best: dict) -> list:
    """best.json's trial rows (raypose.search.sweep.summarise) in the form sweep_history_figure takes
    (Optuna's state names: FAIL for an error, INCOMPLETE for a trial that reported nothing)."""
    trials = []
    for number, row in enumerate(best.get("trials") or []):
        value = row.get("best_val_mpjpe")
        state = trial_state(row)
        if state == "ERROR":
            state = "FAIL"
        elif value is None:
            state = "INCOMPLETE"
        trials.append(
            {"number": number, "value": value, "params": row.get("params") or {}, "state": state}
        )
    return trials


def study_history(db: Path | None, study_name: str | None):
    """(trials, importances) from the sweep's Optuna study copy; empty when there is none.
    A study copy holding one study is read whatever its name."""
    if db is None or not db.exists():
        return [], {}
    import optuna

    from raypose.evaluation.figures import param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{db}"
    names = optuna.study.get_all_study_names(storage=url)
    if study_name not in names and len(names) == 1:
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = [
        {"number": t.number, "value": t.value, "params": t.params, "state": t.state.name}
        for t in study.trials
    ]
    return trials, param_importances(study)
