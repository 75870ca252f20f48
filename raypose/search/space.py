"""Search-space files (search_spaces/*.yaml): what a sweep searches, and how a trial's values land
on a Config.  Plain Python: Optuna is only touched through the trial object handed in.

File format
-----------
    # search_spaces/default.yaml
    metric: val_mpjpe          # optional (default val_mpjpe, or best_val_mpjpe: the same
                               # ranking); any other name is refused
    parameters:                # suggested in file order
      lrn_alpha:      {distribution: loguniform, low: 1.0e-4, high: 1.0e-1}
      schedule:       {distribution: categorical, choices: [joint, pretrain]}
      pretrain_share: {distribution: uniform, low: 0.2, high: 0.6, condition: {schedule: pretrain}}
      lrn_window:     {distribution: int, low: 3, high: 7, step: 2}
      optim.name:     {distribution: fixed, value: adam}

Each parameter name is a config key as `--set` takes it: a dotted path (`model.dropout`), a unique
leaf name (`dropout`) or an alias (`lambda` = loss.detection_weight, `schedule` = schedule.kind).

Distributions and their fields:
    uniform      low, high                     float in [low, high]; low < high
    loguniform   low, high                     float, log scale; 0 < low < high
    int          low, high, [step], [log]      integer in [low, high]; low <= high; step >= 1 divides
                                               high - low; log: true needs low > 0 and step 1
    categorical  choices                       one of a non-empty list of distinct values
    fixed        value                         a constant (not searched, but still applied)
    grid         values                        every value of the list, one trial each; several
                                               grid parameters give every combination. On
                                               data.actions, `values: actions` means each action
                                               of train.h5 alone (one network per action)
A space with a grid parameter is a grid sweep: every combination runs once, for every epoch (no
Optuna sampling, no early stopping), and its other parameters must be fixed; a grid parameter
takes no condition.
Any parameter may also carry `condition: {other: value}` or `condition: {other: [v1, v2]}` (several
entries must all hold): it exists only in trials where `other` took one of those values.  `other`
must be defined earlier in the file and be categorical or fixed, and the values must be among its
choices.

Types follow the config key: uniform and loguniform need a float setting, int an int (or float)
setting, and every choice or fixed value must be a valid value for its setting (strings for
schedule.kind, numbers for lr ...).  The bounds and choices also pass the config's range checks
(dropout < 1, lr > 0 ...).  YAML reads `1e-4` as a string; write `1.0e-4`, although numeric
fields also accept the string form.

load_space() checks all of this and raises SearchSpaceError, naming the file and the key, before a
cluster is started.  SearchSpace.define_by_run is the define-by-run function that Ray Tune's
OptunaSearch takes as `space`; SearchSpace.apply puts a trial's values on a Config.
"""

import copy
import json
import math
from dataclasses import dataclass

import yaml

from raypose.config import Config, ConfigError, _coerce, get_value, resolve_key, set_value
from raypose.validate import clipped, shown

# how much of a whole trial's parameters an error message quotes
PARAMS_SHOWN = 240

DEFAULT_METRIC = "val_mpjpe"
# What a sweep can rank trials by: every trial reports val_mpjpe per epoch and its running best,
# best_val_mpjpe, which is what ASHA, Optuna and best.json use; a metric outside these would be
# accepted by Tune and silently never reported.
REPORTED_METRICS = ("val_mpjpe", "best_val_mpjpe")
MODE = "min"
TOP_LEVEL_KEYS = ("metric", "parameters")
# distribution -> (required fields, optional fields); `condition` is allowed everywhere
FIELDS = {
    "uniform": (("low", "high"), ()),
    "loguniform": (("low", "high"), ()),
    "int": (("low", "high"), ("step", "log")),
    "categorical": (("choices",), ()),
    "fixed": (("value",), ()),
    "grid": (("values",), ()),
}
# `values: actions` on data.actions: one value per action of train.h5, each trial one action
ACTIONS_OF_DATA = "actions"


class SearchSpaceError(ValueError):
    """A bad search-space file; the message names the file and the key."""


def _same(a, b) -> bool:
    """Equality that does not confuse True with 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass(frozen=True)
class Parameter:
    name: str  # as written in the file
    key: str  # the dotted config path it sets
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    step: int = 1
    log: bool = False
    choices: tuple = ()
    value: object = None
    condition: tuple = ()  # ((other name, (allowed values, ...)), ...); all must hold

    def active(self, values: dict) -> bool:
        """Whether this parameter exists, given the values chosen so far."""
        return all(
            other in values and any(_same(values[other], v) for v in allowed)
            for other, allowed in self.condition
        )

    def suggest(self, trial):
        """One value from an optuna Trial (or anything with its suggest_* methods)."""
        if self.distribution == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.distribution == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.distribution == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        return self.value  # fixed: nothing to search

    def describe(self) -> str:
        if self.distribution in ("uniform", "loguniform"):
            text = f"{self.distribution} [{self.low:g}, {self.high:g}]"
        elif self.distribution == "int":
            text = f"int [{self.low}, {self.high}]" + (
                f" step {self.step}" if self.step != 1 else ""
            )
            text += " log" if self.log else ""
        elif self.distribution == "categorical":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.distribution == "grid":
            text = "grid over " + (
                "the actions of train.h5"
                if self.value == ACTIONS_OF_DATA
                else ", ".join(map(str, self.choices))
            )
        else:
            text = f"fixed {self.value}"
        for other, allowed in self.condition:
            text += f"; only if {other} in ({', '.join(map(str, allowed))})"
        return f"{self.name} ({self.key}): {text}"


@dataclass(frozen=True)
class SearchSpace:
    path: str
    metric: str
    parameters: tuple  # of Parameter, in file order

    mode = MODE  # the metric is always minimised

    @property
    def names(self) -> list:
        return [p.name for p in self.parameters]

    @property
    def is_grid(self) -> bool:
        """A grid sweep: every combination of the grid parameters' values runs once."""
        return any(p.distribution == "grid" for p in self.parameters)

    def grid(self, actions=()) -> dict:
        """{name: [values]} of the grid parameters, file order; actions: train.h5's action names,
        for `values: actions`."""
        return {
            p.name: list(actions) if p.value == ACTIONS_OF_DATA else list(p.choices)
            for p in self.parameters
            if p.distribution == "grid"
        }

    def fixed(self) -> dict:
        """{name: value} of the fixed parameters."""
        return {p.name: p.value for p in self.parameters if p.distribution == "fixed"}

    def suggest(self, trial) -> dict:
        """Suggest every parameter whose condition holds, in file order: {name: value}.

        trial: an optuna.trial.Trial (define-by-run).  Fixed parameters are in the result too."""
        values = {}
        for p in self.parameters:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def define_by_run(self, trial) -> dict | None:
        """The `space` callable for ray.tune.search.optuna.OptunaSearch.

        OptunaSearch records what the trial's suggest_* calls return and merges in the dict this
        returns: the fixed parameters that exist in this trial (None when there are none)."""
        values = self.suggest(trial)
        fixed = {
            p.name: values[p.name]
            for p in self.parameters
            if p.distribution == "fixed" and p.name in values
        }
        return fixed or None

    def apply(self, params: dict, cfg: Config | None = None) -> Config:
        """A copy of cfg (default: Config()) with a trial's values set, type- and range-checked.

        params: {name: value} as suggest() returns it, or Tune's trial config from OptunaSearch."""
        unknown = sorted(set(params) - set(self.names))
        if unknown:
            raise SearchSpaceError(
                f"{self.path}: trial parameters {shown(unknown, PARAMS_SHOWN)} "
                f"are not in this search space; it has "
                f"{shown(self.names, PARAMS_SHOWN)}"
            )
        cfg = copy.deepcopy(cfg) if cfg is not None else Config()
        for p in self.parameters:
            if p.name in params:
                try:
                    set_value(cfg, p.key, params[p.name], f"{self.path}: parameters.{p.name}")
                except ConfigError as e:
                    raise SearchSpaceError(str(e)) from None
        try:
            return cfg.validate()
        except ConfigError as e:
            raise SearchSpaceError(
                f"{self.path}: trial parameters {shown(params, PARAMS_SHOWN)}: {e}"
            ) from None

    def check_against(self, cfg: Config) -> None:
        """Check, before any trial runs, that every trial can build a valid config from cfg.

        cfg must be valid itself; then each parameter's extremes (low and high, every choice, the
        fixed value) are set on a copy of cfg, together with the values its condition needs, and
        validated: e.g. schedule: pretrain on a base config with schedule.epochs: 1 fails here."""
        try:
            copy.deepcopy(cfg).validate()
        except ConfigError as e:
            raise SearchSpaceError(f"{self.path}: the base config is not valid: {e}") from None
        by_name = {p.name: p for p in self.parameters}
        for p in self.parameters:
            if p.distribution in ("categorical", "grid"):
                extremes = [("choice", v) for v in p.choices]
            elif p.distribution == "fixed":
                extremes = [("value", p.value)]
            else:
                extremes = [("low", p.low), ("high", p.high)]
            for label, value in extremes:
                trial = copy.deepcopy(cfg)
                needs = self._required_values(p, by_name)
                try:
                    for name, v in needs.items():
                        set_value(trial, by_name[name].key, v, f"{self.path}: parameters.{name}")
                    set_value(trial, p.key, value, f"{self.path}: parameters.{p.name}")
                    trial.validate()
                except ConfigError as e:
                    given = "".join(f" and {n}={shown(v)}" for n, v in needs.items())
                    raise SearchSpaceError(
                        f"{self.path}: parameters.{p.name}: {label} "
                        f"{shown(value)}{given} gives an invalid config: "
                        f"{e}"
                    ) from None

    @staticmethod
    def _required_values(p: Parameter, by_name: dict) -> dict:
        """Values of the parameters p's condition (and theirs, recursively) needs: the first allowed."""
        needs = {}
        for other, allowed in p.condition:
            needs.update(SearchSpace._required_values(by_name[other], by_name))
            needs[other] = allowed[0]
        return needs

    def to_config_overrides(self, params: dict) -> list:
        """The same values as `--set KEY=VALUE` strings (dotted keys), e.g. for a job command line."""
        unknown = sorted(set(params) - set(self.names))
        if unknown:
            raise SearchSpaceError(
                f"{self.path}: trial parameters {shown(unknown, PARAMS_SHOWN)} "
                f"are not in this search space; it has "
                f"{shown(self.names, PARAMS_SHOWN)}"
            )
        return [
            f"{p.key}={_format_override(params[p.name])}"
            for p in self.parameters
            if p.name in params
        ]

    def describe(self) -> str:
        lines = [f"search space {self.path}: minimise {self.metric}"]
        lines += ["  " + p.describe() for p in self.parameters]
        return "\n".join(lines)


def _format_override(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a double-quoted YAML scalar: "1" stays a string
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return repr(value)


# --- loading and checking --------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = []
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.append(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_space(path) -> SearchSpace:
    """Read and check a search-space file; SearchSpaceError names the file and the key."""
    from raypose.validate import read_yaml

    source = str(path)
    try:
        doc = read_yaml(path, "search-space file", SearchSpaceError, loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise SearchSpaceError(
            f"{source}: line {e.line}: key {shown(e.key)} appears twice"
        ) from None
    return parse_space(doc, source)


def parse_space(doc, source: str = "<search space>") -> SearchSpace:
    """Check a search space given as a dict (a parsed file); source names it in errors."""
    if not isinstance(doc, dict):
        raise SearchSpaceError(
            f"{source}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, "
            f"got {type(doc).__name__}"
        )
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            raise SearchSpaceError(
                f"{source}: unknown top-level key {shown(key)}; expected "
                f"{', '.join(TOP_LEVEL_KEYS)}"
            )
    metric = doc.get("metric", DEFAULT_METRIC)
    if metric not in REPORTED_METRICS:
        raise SearchSpaceError(
            f"{source}: metric {shown(metric)} is not one a trial reports for "
            f"ranking; expected one of {', '.join(REPORTED_METRICS)}"
        )
    params = doc.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(
            f"{source}: parameters must be a non-empty mapping of "
            f"name: {{distribution: ...}}, got {shown(params)}"
        )
    parsed, keys = [], {}
    for name, spec in params.items():
        param = _parse_parameter(name, spec, parsed, params, source)
        if param.key in keys:
            raise SearchSpaceError(
                f"{source}: parameters.{name}: sets {param.key}, as "
                f"parameters.{keys[param.key]} already does"
            )
        keys[param.key] = name
        parsed.append(param)
    if any(p.distribution == "grid" for p in parsed):
        sampled = [p.name for p in parsed if p.distribution not in ("grid", "fixed")]
        if sampled:
            raise SearchSpaceError(
                f"{source}: parameters.{sampled[0]}: a space with a grid parameter runs every "
                "combination once, so its other parameters must be fixed (sampling and a grid "
                "do not mix); make it fixed or a grid"
            )
    return SearchSpace(path=source, metric=metric, parameters=tuple(parsed))


def _parse_parameter(name, spec, earlier: list, all_params: dict, source: str) -> Parameter:
    where = f"{source}: parameters.{clipped(name)}"
    if not isinstance(name, str):
        raise SearchSpaceError(f"{where}: parameter names must be config keys (strings)")

    def fail(what):
        return SearchSpaceError(f"{where}: {what}")

    if not isinstance(spec, dict):
        raise fail(
            f"expected a mapping like {{distribution: uniform, low: 0.1, high: 0.9}}, "
            f"got {shown(spec)}"
        )
    kind = spec.get("distribution")
    if kind is None:
        raise fail(f"missing distribution; expected one of {', '.join(FIELDS)}")
    if kind not in FIELDS:
        raise fail(f"unknown distribution {shown(kind)}; expected one of {', '.join(FIELDS)}")
    required, optional = FIELDS[kind]
    allowed = ("distribution", "condition") + required + optional
    for field in spec:
        if field not in allowed:
            raise fail(f"unknown field {shown(field)} for {kind}; expected {', '.join(allowed)}")
    missing = [f for f in required if f not in spec]
    if missing:
        raise fail(f"{kind} needs {' and '.join(required)}; missing {', '.join(missing)}")

    try:
        key = resolve_key(Config(), name, where)
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    default = get_value(Config(), key)
    is_float_key = isinstance(default, float)
    is_int_key = isinstance(default, int) and not isinstance(default, bool)
    kind_of_setting = {
        bool: "a bool",
        int: "an int",
        float: "a float",
        str: "a string",
        list: "a list",
    }
    setting = f"{key} is {kind_of_setting.get(type(default), type(default).__name__)} setting"

    fields = {}
    if kind in ("uniform", "loguniform"):
        if not is_float_key:
            hint = "use distribution: int" if is_int_key else "use categorical or fixed"
            raise fail(f"{kind} draws floats but {setting}; {hint}")
        low, high = (_number(spec[f], f, fail) for f in ("low", "high"))
        if low > high:
            raise fail(f"{kind} needs low < high, got low={low:g}, high={high:g}")
        if low == high:
            raise fail(
                f"{kind} needs low < high, got low == high == {low:g}; "
                f"use distribution: fixed for a constant"
            )
        if kind == "loguniform" and low <= 0:
            raise fail(f"loguniform needs low > 0, got {low:g}")
        fields = dict(low=float(low), high=float(high))
        _check_range(key, "low", low, fail)
        _check_range(key, "high", high, fail)
    elif kind == "int":
        if not (is_int_key or is_float_key):
            raise fail(f"int draws integers but {setting}; use categorical or fixed")
        low, high = (_integer(spec[f], f, fail) for f in ("low", "high"))
        step = _integer(spec.get("step", 1), "step", fail)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise fail(f"log must be true or false, got {shown(log)}")
        if low > high:
            raise fail(f"int needs low <= high, got low={low}, high={high}")
        if step < 1:
            raise fail(f"int needs step >= 1, got {step}")
        if (high - low) % step:
            raise fail(
                f"int needs high - low to be a multiple of step, got low={low}, "
                f"high={high}, step={step}"
            )
        if log and low <= 0:
            raise fail(f"int with log: true needs low > 0, got {low}")
        if log and step != 1:
            raise fail(f"int with log: true needs step 1, got {step}")
        fields = dict(low=low, high=high, step=step, log=log)
        _check_range(key, "low", low, fail)
        _check_range(key, "high", high, fail)
    elif kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(f"categorical needs choices: a non-empty list, got {shown(choices)}")
        fields = dict(choices=_distinct_values(choices, "choices", default, key, where, fail))
    elif kind == "grid":
        values = spec["values"]
        if values == ACTIONS_OF_DATA:
            if key != "data.actions":
                raise fail(
                    f"values: {ACTIONS_OF_DATA} (each action of train.h5) is only for "
                    "data.actions; list the values"
                )
            fields = dict(value=ACTIONS_OF_DATA)
        else:
            if not isinstance(values, list) or not values:
                raise fail(
                    f"grid needs values: a non-empty list (or `{ACTIONS_OF_DATA}` on "
                    f"data.actions), got {shown(values)}"
                )
            fields = dict(choices=_distinct_values(values, "values", default, key, where, fail))
        if spec.get("condition") is not None:
            raise fail("a grid parameter takes no condition: every combination runs")
    else:  # fixed
        value = _maybe_float(spec["value"]) if is_float_key else spec["value"]
        _check_value(value, default, key, f"{where}: value", "value", fail)
        fields = dict(value=value)

    condition = _parse_condition(spec.get("condition"), earlier, all_params, fail)
    return Parameter(name=name, key=key, distribution=kind, condition=condition, **fields)


def _distinct_values(values: list, field: str, default, key: str, where: str, fail) -> tuple:
    """A categorical's choices or a grid's values: plain scalars, each valid for the config key
    (as `--set` checks it), none twice."""
    checked = []
    for i, value in enumerate(values):
        label = f"{field}[{i}]"
        if not isinstance(value, (bool, int, float, str)):
            raise fail(f"{label} must be a number, a string or a bool, got {shown(value)}")
        value = _maybe_float(value) if isinstance(default, float) else value
        _check_value(value, default, key, f"{where}: {label}", label, fail)
        if any(_same(value, c) for c in checked):
            raise fail(f"{label} {shown(value)} appears twice")
        checked.append(value)
    return tuple(checked)


def _parse_condition(condition, earlier: list, all_params: dict, fail) -> tuple:
    if condition is None:
        return ()
    if not isinstance(condition, dict) or not condition:
        raise fail(
            f"condition must be a mapping like {{schedule: pretrain}}, got {shown(condition)}"
        )
    by_name = {p.name: p for p in earlier}
    parsed = []
    for other, values in condition.items():
        if other not in by_name:
            if other in all_params:
                raise fail(
                    f"condition on {shown(other)}, which is defined later in the file; "
                    f"move it above this parameter"
                )
            raise fail(
                f"condition on unknown parameter {shown(other)}; defined so far: "
                f"{', '.join(by_name) or 'none'}"
            )
        target = by_name[other]
        if target.distribution not in ("categorical", "fixed"):
            raise fail(
                f"condition on {shown(other)}, which is {target.distribution}; a condition "
                f"needs a categorical or fixed parameter"
            )
        possible = target.choices if target.distribution == "categorical" else (target.value,)
        values = values if isinstance(values, list) else [values]
        if not values:
            raise fail(f"condition on {shown(other)} lists no values")
        if any(isinstance(c, float) for c in possible):
            values = [_maybe_float(v) for v in values]
        for v in values:
            if not any(_same(v, c) for c in possible):
                raise fail(
                    f"condition value {shown(v)} for {shown(other)} is not among its "
                    f"{'choices' if target.distribution == 'categorical' else 'value'} "
                    f"{shown(list(possible), PARAMS_SHOWN)}"
                )
        parsed.append((other, tuple(values)))
    return tuple(parsed)


def _maybe_float(value):
    """YAML 1.1 reads 1e-4 as a string; take it as the number that was meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _number(value, field, fail) -> float:
    value = _maybe_float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(f"{field} must be a finite number, got {shown(value)}")
    return value


def _integer(value, field, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{field} must be an integer, got {shown(value)}")
    return value


def _check_value(value, default, key, source, label, fail) -> None:
    """The config's own type check (the same as --set), then its range check."""
    try:
        _coerce(value, default, key, source)
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    _check_range(key, label, value, fail)


def _check_range(key, label, value, fail) -> None:
    """The config's range checks for one value of one setting (on an otherwise default Config)."""
    cfg = Config()
    try:
        set_value(cfg, key, value, label)
        cfg.validate()
    except ConfigError as e:
        raise fail(f"{label} {shown(value)} is not a valid {key}: {e}") from None
