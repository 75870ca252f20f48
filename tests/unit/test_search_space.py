"""Search-space files: every check names the file and the key; define-by-run on a real Optuna study."""

import math
import warnings
from pathlib import Path

import optuna
import pytest

from raypose.config import Config, apply_overrides
from raypose.search.space import SearchSpaceError, load_space, parse_space

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "search_spaces" / "default.yaml"
SMOKE = REPO / "search_spaces" / "smoke.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space_file(tmp_path, parameters: str, head: str = "", name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(head + "parameters:\n" + parameters)
    return path


def _error(path) -> str:
    with pytest.raises(SearchSpaceError) as err:
        load_space(path)
    return str(err.value)


# --- the files in the repository ---------------------------------------------------------------


def test_default_and_smoke_spaces_load():
    default = load_space(DEFAULT)
    assert default.metric == "val_mpjpe" and default.mode == "min"
    for name in ("lrn_alpha", "lrn_beta", "lambda", "schedule", "pretrain_share", "lr"):
        assert name in default.names
    keys = {p.name: p.key for p in default.parameters}
    assert keys["lambda"] == "loss.detection_weight" and keys["schedule"] == "schedule.kind"
    share = next(p for p in default.parameters if p.name == "pretrain_share")
    assert share.condition == (("schedule", ("pretrain",)),)

    smoke = load_space(SMOKE)  # the demo's space: the mission's five parameters
    assert smoke.names == ["lrn_alpha", "lrn_beta", "schedule", "lambda", "pretrain_share", "lr"]
    assert "pretrain_share (schedule.pretrain_share)" in smoke.describe()


# --- each check names the file and the key -------------------------------------------------------


@pytest.mark.parametrize(
    "parameters, key, what",
    [
        (
            "  lrn_alpha: {distribution: normal, low: 0, high: 1}\n",
            "lrn_alpha",
            "unknown distribution 'normal'",
        ),
        (
            "  lrn_alpha: {low: 0.1, high: 1.0}\n",
            "lrn_alpha",
            "missing distribution; expected one of uniform, loguniform",
        ),
        (
            "  lrn_beta: {distribution: uniform, low: 0.5}\n",
            "lrn_beta",
            "uniform needs low and high; missing high",
        ),
        (
            "  lrn_window: {distribution: int, high: 7}\n",
            "lrn_window",
            "int needs low and high; missing low",
        ),
        ("  schedule: {distribution: categorical}\n", "schedule", "categorical needs choices"),
        ("  schedule: {distribution: categorical, choices: []}\n", "schedule", "non-empty list"),
        ("  schedule: {distribution: fixed}\n", "schedule", "fixed needs value"),
        (
            "  lrn_beta: {distribution: uniform, low: 0.5, hihg: 1.0, high: 1.0}\n",
            "lrn_beta",
            "unknown field 'hihg' for uniform",
        ),
        (
            "  lrn_beta: {distribution: uniform, low: 1.0, high: 0.5}\n",
            "lrn_beta",
            "low < high, got low=1, high=0.5",
        ),
        ("  lrn_beta: {distribution: uniform, low: 0.5, high: 0.5}\n", "lrn_beta", "low == high"),
        (
            "  lrn_alpha: {distribution: loguniform, low: 0.5, high: 0.5}\n",
            "lrn_alpha",
            "low == high",
        ),
        ("  lrn_window: {distribution: int, low: 7, high: 3}\n", "lrn_window", "low <= high"),
        (
            "  lrn_beta: {distribution: uniform, low: low, high: 1.0}\n",
            "lrn_beta",
            "low must be a finite number",
        ),
        (
            "  lrn_window: {distribution: int, low: 3.0, high: 7}\n",
            "lrn_window",
            "low must be an integer",
        ),
        (
            "  lrn_window: {distribution: int, low: 3, high: 8, step: 2}\n",
            "lrn_window",
            "multiple of step",
        ),
        (
            "  lrn_window: {distribution: int, low: 3, high: 7, step: 0}\n",
            "lrn_window",
            "step >= 1",
        ),
        (
            "  lrn_window: {distribution: int, low: 3, high: 7, step: 2, log: true}\n",
            "lrn_window",
            "log: true needs step 1",
        ),
        (
            "  lrn_window: {distribution: int, low: 3, high: 7, log: maybe}\n",
            "lrn_window",
            "log must be true or false",
        ),
        (
            "  schedule: {distribution: categorical, choices: [joint, joint]}\n",
            "schedule",
            "appears twice",
        ),
    ],
)
def test_malformed_parameter(tmp_path, parameters, key, what):
    path = _space_file(tmp_path, parameters)
    message = _error(path)
    assert message.startswith(f"{path}: parameters.{key}: "), message
    assert what in message


def test_log_distribution_needs_positive_low(tmp_path):
    path = _space_file(tmp_path, "  lrn_alpha: {distribution: loguniform, low: 0, high: 0.1}\n")
    assert _error(path) == f"{path}: parameters.lrn_alpha: loguniform needs low > 0, got 0"
    path = _space_file(tmp_path, "  lr: {distribution: loguniform, low: -1.0e-3, high: 0.1}\n")
    assert "parameters.lr: loguniform needs low > 0, got -0.001" in _error(path)
    path = _space_file(tmp_path, "  epochs: {distribution: int, low: 0, high: 8, log: true}\n")
    assert f"{path}: parameters.epochs: int with log: true needs low > 0, got 0" == _error(path)


def test_condition_on_unknown_parameter(tmp_path):
    path = _space_file(
        tmp_path,
        "  pretrain_share: {distribution: uniform, low: 0.2, high: 0.6, "
        "condition: {schedul: pretrain}}\n",
    )
    message = _error(path)
    assert message.startswith(f"{path}: parameters.pretrain_share: ")
    assert "condition on unknown parameter 'schedul'" in message


def test_condition_on_a_later_parameter(tmp_path):
    path = _space_file(
        tmp_path,
        "  pretrain_share: {distribution: uniform, low: 0.2, high: 0.6, "
        "condition: {schedule: pretrain}}\n"
        "  schedule: {distribution: categorical, choices: [joint, pretrain]}\n",
    )
    message = _error(path)
    assert message.startswith(f"{path}: parameters.pretrain_share: ")
    assert "'schedule', which is defined later in the file" in message


def test_condition_value_not_among_choices(tmp_path):
    path = _space_file(
        tmp_path,
        "  schedule: {distribution: categorical, choices: [joint, pretrain]}\n"
        "  pretrain_share: {distribution: uniform, low: 0.2, high: 0.6, "
        "condition: {schedule: [pretrain, detection]}}\n",
    )
    message = _error(path)
    assert message.startswith(f"{path}: parameters.pretrain_share: ")
    assert "condition value 'detection' for 'schedule' is not among its choices" in message


def test_condition_on_a_continuous_parameter(tmp_path):
    path = _space_file(
        tmp_path,
        "  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
        "  momentum: {distribution: uniform, low: 0.8, high: 0.99, condition: {lr: 0.001}}\n",
    )
    message = _error(path)
    assert message.startswith(f"{path}: parameters.momentum: ")
    assert "which is loguniform; a condition needs a categorical or fixed parameter" in message


def test_malformed_condition(tmp_path):
    path = _space_file(
        tmp_path,
        "  schedule: {distribution: categorical, choices: [joint, pretrain]}\n"
        "  pretrain_share: {distribution: uniform, low: 0.2, high: 0.6, condition: pretrain}\n",
    )
    assert f"{path}: parameters.pretrain_share: condition must be a mapping" in _error(path)


def test_unknown_top_level_key(tmp_path):
    path = _space_file(
        tmp_path,
        "  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}\n",
        head="metric: val_mpjpe\nmode: max\n",
    )
    assert _error(path) == f"{path}: unknown top-level key 'mode'; expected metric, parameters"


def test_missing_or_empty_parameters(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("metric: val_mpjpe\n")
    assert _error(path).startswith(f"{path}: parameters must be a non-empty mapping")
    path.write_text("metric: [a]\nparameters: {lr: {distribution: fixed, value: 0.1}}\n")
    assert _error(path).startswith(f"{path}: metric ['a'] is not one a trial reports")
    # a name no trial reports would be accepted by Tune and never reported
    path.write_text("metric: accuracy\nparameters: {lr: {distribution: fixed, value: 0.1}}\n")
    assert _error(path).startswith(f"{path}: metric 'accuracy' is not one a trial reports")
    path.write_text("- lr\n")
    assert _error(path).startswith(f"{path}: expected a mapping")


def test_parameter_that_is_not_a_config_key(tmp_path):
    path = _space_file(
        tmp_path, "  learning_rate: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
    )
    message = _error(path)
    assert message.startswith(f"{path}: parameters.learning_rate: unknown key 'learning_rate'")
    path = _space_file(tmp_path, "  name: {distribution: categorical, choices: [adam, sgd]}\n")
    assert f"{path}: parameters.name: key 'name' is ambiguous" in _error(path)


def test_two_names_for_one_key(tmp_path):
    path = _space_file(
        tmp_path,
        "  lambda: {distribution: fixed, value: 1.0}\n"
        "  loss.detection_weight: {distribution: fixed, value: 2.0}\n",
    )
    assert (
        f"{path}: parameters.loss.detection_weight: sets loss.detection_weight, as "
        f"parameters.lambda already does"
    ) == _error(path)


def test_duplicate_yaml_key(tmp_path):
    path = _space_file(
        tmp_path,
        "  lr: {distribution: fixed, value: 0.1}\n  lr: {distribution: fixed, value: 0.2}\n",
    )
    assert _error(path) == f"{path}: line 3: key 'lr' appears twice"


@pytest.mark.parametrize(
    "parameters, key, what",
    [
        # categorical choices of strings for a float key
        (
            "  lrn_alpha: {distribution: categorical, choices: [small, large]}\n",
            "lrn_alpha",
            "model.lrn_alpha expects float, got 'small' (str)",
        ),
        # numbers for a string key
        (
            "  schedule: {distribution: categorical, choices: [joint, 1]}\n",
            "schedule",
            "schedule.kind expects str, got 1 (int)",
        ),
        ("  optim.name: {distribution: fixed, value: 3}\n", "optim.name", "optim.name expects str"),
        # floats drawn for an int key, numbers drawn for a string or bool key
        (
            "  lrn_window: {distribution: uniform, low: 3, high: 7}\n",
            "lrn_window",
            "uniform draws floats but model.lrn_window is an int setting; use distribution: int",
        ),
        (
            "  schedule: {distribution: uniform, low: 0, high: 1}\n",
            "schedule",
            "uniform draws floats but schedule.kind is a string setting; use categorical or fixed",
        ),
        (
            "  augment: {distribution: int, low: 0, high: 1}\n",
            "augment",
            "int draws integers but data.augment",
        ),
        (
            "  batch_size: {distribution: categorical, choices: [32, 64.5]}\n",
            "batch_size",
            "data.batch_size expects int, got 64.5",
        ),
    ],
)
def test_wrong_type_for_the_config_key(tmp_path, parameters, key, what):
    path = _space_file(tmp_path, parameters)
    message = _error(path)
    assert message.startswith(f"{path}: parameters.{key}: "), message
    assert what in message


@pytest.mark.parametrize(
    "parameters, key, what",
    [
        (
            "  dropout: {distribution: uniform, low: 0.0, high: 1.0}\n",
            "dropout",
            "high 1.0 is not a valid model.dropout",
        ),
        (
            "  optim.name: {distribution: categorical, choices: [adam, rmsprop]}\n",
            "optim.name",
            "choices[1] 'rmsprop' is not a valid optim.name: optim.name must be adam or sgd",
        ),
        (
            "  lrn_window: {distribution: int, low: 2, high: 6, step: 2}\n",
            "lrn_window",
            "must be an odd",
        ),
        (
            "  pretrain_share: {distribution: uniform, low: 0.0, high: 0.5}\n",
            "pretrain_share",
            "must be in (0, 1)",
        ),
    ],
)
def test_values_outside_the_config_range(tmp_path, parameters, key, what):
    path = _space_file(tmp_path, parameters)
    message = _error(path)
    assert message.startswith(f"{path}: parameters.{key}: "), message
    assert what in message


def test_missing_and_malformed_files(tmp_path):
    assert (
        _error(tmp_path / "nope.yaml")
        == f"search-space file {tmp_path / 'nope.yaml'} does not exist"
    )
    path = tmp_path / "bad.yaml"
    path.write_text("parameters: {lr: [1, 2\n")
    # one line with the place, not the parser's whole multi-line message
    assert _error(path) == (
        f"search-space file {path}: line 2, column 1: not valid YAML "
        "(expected ',' or ']', but got '<stream end>')"
    )
    path.write_bytes(b"metric: val_mpjpe\n# \xe9\n")
    assert _error(path) == (
        f"search-space file {path}: line 2: not UTF-8 text (byte 0xe9); save it as UTF-8"
    )


def test_accepted_forms(tmp_path):
    path = _space_file(
        tmp_path,
        "  lrn_alpha: {distribution: loguniform, low: 1e-4, high: 1e-1}\n"  # YAML strings
        "  model.dropout: {distribution: uniform, low: 0, high: 0.5}\n"
        "  epochs: {distribution: int, low: 2, high: 16, log: true}\n"
        "  seed: {distribution: fixed, value: 3}\n"
        "  lambda: {distribution: categorical, choices: [0.5, 1, 2]}\n"
        "  optim.name: {distribution: categorical, choices: [adam, sgd]}\n"
        "  momentum: {distribution: uniform, low: 0.8, high: 0.99, "
        "condition: {optim.name: [sgd]}}\n"
        "  weight_decay: {distribution: fixed, value: 1.0e-4, "
        "condition: {optim.name: sgd, seed: 3}}\n",
    )
    space = load_space(path)
    alpha = space.parameters[0]
    assert (alpha.low, alpha.high) == (1e-4, 1e-1)
    assert space.parameters[1].key == "model.dropout"
    assert space.parameters[-1].condition == (("optim.name", ("sgd",)), ("seed", (3,)))


# --- define-by-run ------------------------------------------------------------------------------


def _run_study(space, n_trials: int):
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    seen = []

    def objective(trial):
        params = space.suggest(trial)
        seen.append(params)
        cfg = space.apply(params, Config())  # every suggestion is a valid config
        return cfg.optim.lr * 1e3 + (0.5 if cfg.schedule.kind == "pretrain" else 0.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is experimental; conditional spaces warn
        study.optimize(objective, n_trials=n_trials)
    return study, seen


def test_define_by_run_on_default_space():
    space = load_space(DEFAULT)
    study, seen = _run_study(space, 20)
    assert len(study.trials) == 20
    schedules = {p["schedule"] for p in seen}
    assert schedules == {"joint", "pretrain"}  # both branches were explored
    by_name = {p.name: p for p in space.parameters}
    for params, trial in zip(seen, study.trials):
        assert params == trial.params  # all were suggested through the trial, none invented
        pretrain = params["schedule"] == "pretrain"
        assert ("pretrain_share" in params) == pretrain
        assert ("lambda" in params) == (not pretrain)
        assert ("momentum" in params) == (params["optim.name"] == "sgd")
        assert list(params) == [n for n in space.names if n in params]  # file order
        for name, value in params.items():
            p = by_name[name]
            if p.distribution in ("uniform", "loguniform", "int"):
                assert p.low <= value <= p.high, (name, value)
            if p.distribution == "int":
                assert isinstance(value, int) and (value - p.low) % p.step == 0
            if p.distribution == "categorical":
                assert value in p.choices


def test_define_by_run_on_smoke_space_and_fixed_values(tmp_path):
    path = _space_file(
        tmp_path,
        SMOKE.read_text().split("parameters:\n", 1)[1]
        + "  epochs: {distribution: fixed, value: 2}\n",
    )
    space = load_space(path)
    study, seen = _run_study(space, 8)
    for params, trial in zip(seen, study.trials):
        assert params["epochs"] == 2 and "epochs" not in trial.params
        assert ("pretrain_share" in params) == (params["schedule"] == "pretrain")

    # define_by_run returns only the constants; the rest goes through the trial
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert space.define_by_run(trial) == {"epochs": 2}
    assert set(trial.params) | {"epochs"} >= {"schedule", "lr", "epochs"}
    no_fixed = load_space(SMOKE)
    assert no_fixed.define_by_run(optuna.create_study().ask()) is None


def test_define_by_run_with_ray_tune_optuna_search():
    """The contract of ray.tune.search.optuna.OptunaSearch(space=callable): no Ray instance needed."""
    pytest.importorskip("ray.tune.search.optuna")
    import ray
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(DEFAULT)
    searcher = OptunaSearch(
        space=space.define_by_run,
        metric=space.metric,
        mode=space.mode,
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(6):
            config = searcher.suggest(f"trial_{i}")
            cfg = space.apply(config)
            assert ("pretrain_share" in config) == (cfg.schedule.kind == "pretrain")
            searcher.on_trial_complete(
                f"trial_{i}", {space.metric: 100.0 - i, "training_iteration": 1}
            )
    assert not ray.is_initialized()


# --- applying a trial's values ------------------------------------------------------------------


def test_apply_sets_config_and_leaves_the_base_alone():
    space = load_space(DEFAULT)
    base = Config()
    params = {
        "lrn_alpha": 0.01,
        "schedule": "pretrain",
        "pretrain_share": 0.4,
        "lr": 1e-4,
        "optim.name": "sgd",
        "momentum": 0.95,
        "batch_size": 32,
        "lrn_window": 7,
    }
    cfg = space.apply(params, base)
    assert cfg.model.lrn_alpha == 0.01 and cfg.model.lrn_window == 7
    assert cfg.schedule.kind == "pretrain" and cfg.schedule.pretrain_share == 0.4
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.95 and cfg.data.batch_size == 32
    assert base == Config()  # a copy was changed, not the base
    # the same values as --set strings
    overrides = space.to_config_overrides(params)
    assert "model.lrn_alpha=0.01" in overrides and 'schedule.kind="pretrain"' in overrides
    assert apply_overrides(Config(), overrides) == cfg


def test_apply_checks_types_names_and_combinations():
    space = load_space(DEFAULT)
    with pytest.raises(SearchSpaceError, match="parameters.lr: optim.lr expects float"):
        space.apply({"lr": "fast"})
    with pytest.raises(
        SearchSpaceError, match=r"trial parameters \['gamma'\] are not in this search space"
    ):
        space.apply({"gamma": 1.0})
    base = apply_overrides(Config(), ["epochs=1"])
    with pytest.raises(SearchSpaceError, match="schedule.epochs must be >= 2 for the pretrain"):
        space.apply({"schedule": "pretrain", "pretrain_share": 0.3}, base)


def test_parse_space_from_a_dict():
    space = parse_space(
        {"parameters": {"lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}}, "inline"
    )
    assert space.path == "inline" and space.metric == "val_mpjpe"
    with pytest.raises(SearchSpaceError, match="^inline: parameters.lr: loguniform needs low > 0"):
        parse_space(
            {"parameters": {"lr": {"distribution": "loguniform", "low": 0.0, "high": 1e-2}}},
            "inline",
        )
    assert math.isclose(space.parameters[0].high, 1e-2)


def test_check_against_a_base_config(tmp_path):
    for path in (DEFAULT, SMOKE):
        load_space(path).check_against(Config())  # the shipped spaces fit the defaults
    space = load_space(SMOKE)
    one_epoch = apply_overrides(Config(), ["epochs=1"])
    with pytest.raises(SearchSpaceError) as err:
        space.check_against(one_epoch)
    message = str(err.value)
    assert message.startswith(
        f"{SMOKE}: parameters.schedule: choice 'pretrain' gives an invalid config"
    )
    assert "schedule.epochs must be >= 2 for the pretrain schedule" in message

    # a conditional parameter is checked with the value its condition needs
    path = _space_file(
        tmp_path,
        "  schedule: {distribution: categorical, choices: [joint, pretrain]}\n"
        "  epochs: {distribution: int, low: 1, high: 4, condition: {schedule: pretrain}}\n",
    )
    with pytest.raises(
        SearchSpaceError,
        match=r"parameters.epochs: low 1 and schedule='pretrain' "
        r"gives an invalid config",
    ):
        load_space(path).check_against(Config())

    bad_base = Config()
    bad_base.scaling.workers = 0
    with pytest.raises(SearchSpaceError, match="the base config is not valid: scaling.workers"):
        space.check_against(bad_base)


# --- hostile input: bounded YAML, bounded messages ----------------------------------------------

from tests.unit.test_config import BOMB  # noqa: E402  the billion-laughs document, 9**9 strings


def test_billion_laughs_space_is_refused_fast_in_one_short_line(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    message = _error(path)
    # measured against the minutes and gigabytes the expansion would take
    assert time.perf_counter() - start < 5
    assert (
        message.startswith(
            f"search-space file {path}: refused: it expands to more than 10000 values"
        )
        and "YAML aliases" in message
    )
    assert "\n" not in message and len(message) < 1024


def test_aliases_within_bounds_still_work_and_duplicates_are_still_caught(tmp_path):
    path = _space_file(
        tmp_path,
        "  lrn_alpha: &log {distribution: loguniform, low: 1.0e-4, high: 1.0e-1}\n  lr: *log\n",
    )
    space = load_space(path)
    assert [(p.key, p.low, p.high) for p in space.parameters] == [
        ("model.lrn_alpha", 1e-4, 1e-1),
        ("optim.lr", 1e-4, 1e-1),
    ]
    path = _space_file(
        tmp_path,
        "  lr: {distribution: fixed, value: 0.1}\n  lr: {distribution: fixed, value: 0.2}\n",
        name="twice.yaml",
    )
    assert _error(path) == f"{path}: line 3: key 'lr' appears twice"


HUGE = "z" * 100_000
SCHEDULE = "  schedule: {distribution: categorical, choices: [joint, pretrain]}\n"


@pytest.mark.parametrize(
    "head, parameters, culprit",
    [
        (f"metric: {HUGE}\n", "  lr: {distribution: fixed, value: 0.1}\n", "metric"),
        (f"? {HUGE}\n: 1\n", "  lr: {distribution: fixed, value: 0.1}\n", "unknown top-level key"),
        ("", f"  lr: {{distribution: fixed, value: {HUGE}}}\n", "parameters.lr: value"),
        ("", f"  lr: {{distribution: {HUGE}}}\n", "unknown distribution"),
        ("", f"  seed: {{distribution: categorical, choices: [1, {HUGE}]}}\n", "choices[1]"),
        ("", f"  lr: {{distribution: uniform, low: {HUGE}, high: 1}}\n", "low must be"),
        ("", f"  lr: {{distribution: uniform, low: 0.1, high: 1, ? {HUGE}: 1}}\n", "unknown field"),
        ("", f"  epochs: {{distribution: int, low: 1, high: 2, log: {HUGE}}}\n", "log must be"),
        ("", f"  ? {HUGE}\n  : {{distribution: fixed, value: 1}}\n", "unknown key"),
        (
            "",
            SCHEDULE + f"  pretrain_share: {{distribution: fixed, value: 0.5, "
            f"condition: {{schedule: {HUGE}}}}}\n",
            "condition value",
        ),
        (
            "",
            SCHEDULE + f"  pretrain_share: {{distribution: fixed, value: 0.5, "
            f"condition: {{? {HUGE}: 1}}}}\n",
            "condition on unknown parameter",
        ),
    ],
)
def test_rejected_values_are_quoted_only_in_part(tmp_path, head, parameters, culprit):
    path = _space_file(tmp_path, parameters, head=head)
    message = _error(path)
    # an unknown key's message lists the ~50 known keys (~900 characters) on top
    assert culprit in message and len(message) < 2048, message[:3000]
    assert str(path) in message and "z" * 100 not in message and "characters)" in message


def test_trial_parameters_are_quoted_only_in_part():
    space = parse_space({"parameters": {"lr": {"distribution": "fixed", "value": 0.1}}}, "s.yaml")
    with pytest.raises(SearchSpaceError) as err:
        space.apply({"lr": 0.1, HUGE: 1})
    assert "z" * 300 not in str(err.value) and len(str(err.value)) < 1024
    with pytest.raises(SearchSpaceError) as err:
        space.apply({"lr": HUGE})
    assert "z" * 100 not in str(err.value) and len(str(err.value)) < 1024
