"""The config tree: defaults <- YAML file <- --set overrides, with errors that name file/flag and key."""

import json
import sys

import pytest

from raypose.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_key,
)


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert (cfg.model.lrn_alpha, cfg.model.lrn_beta, cfg.model.lrn_window) == (0.0025, 0.75, 5)
    # lambda is not the paper's 1: E_d sums 1700 terms against E_r's 51 (README, "The network")
    assert cfg.loss.detection_weight == 1.0e-4
    assert cfg.schedule.kind == "joint" and cfg.scaling.workers == 1


def test_yaml_file_then_set_overrides(tmp_path):
    path = _write(
        tmp_path,
        """
model:
  lrn_alpha: 0.01
  dropout: 0.5
schedule: {kind: pretrain, epochs: 4}
optim:
  lr: 1.0e-3
lambda: 2
seed: 7
data:
  val_subjects: [S7, S8]
""",
    )
    cfg = load_config(
        path, ["lr=1e-4", "model.dropout=0.75", "workers=2", "schedule.pretrain_share=0.25"]
    )
    assert cfg.model.lrn_alpha == 0.01
    assert cfg.model.dropout == 0.75  # --set wins over the file
    assert cfg.schedule.kind == "pretrain" and cfg.schedule.epochs == 4
    assert cfg.optim.lr == 1e-4 and isinstance(
        cfg.optim.lr, float
    )  # "1e-4" is a number, not a string
    assert cfg.loss.detection_weight == 2.0 and isinstance(cfg.loss.detection_weight, float)
    assert cfg.scaling.workers == 2 and cfg.seed == 7
    assert cfg.data.val_subjects == ["S7", "S8"]
    assert cfg.pretrain_epochs() == 1  # round(4 * 0.25)


def test_set_parses_yaml_scalars():
    cfg = apply_overrides(
        Config(), ["augment=false", "val_subjects=S1,S5", "optim.name=sgd", "momentum=0.8"]
    )
    assert cfg.data.augment is False and cfg.data.val_subjects == ["S1", "S5"]
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.8


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = _write(tmp_path, "model:\n  lrn_alfa: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "model.lrn_alfa" in str(err.value)

    path = _write(tmp_path, "learning_rate: 0.1\n", "top.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "learning_rate" in str(err.value)


def test_unknown_key_in_set_names_flag_and_key():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.lrn_gamma=1"])
    assert "--set" in str(err.value) and "model.lrn_gamma" in str(err.value)


def test_ambiguous_leaf_name():
    # optim.name and storage.name
    with pytest.raises(ConfigError, match="ambiguous.*optim.name.*storage.name"):
        load_config(overrides=["name=sgd"])


def test_wrong_type_in_yaml(tmp_path):
    path = _write(tmp_path, "schedule:\n  epochs: ten\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "schedule.epochs expects int" in str(err.value)

    path = _write(tmp_path, "seed: true\n", "bool.yaml")  # a bool is not an int here
    with pytest.raises(ConfigError, match="seed expects int"):
        load_config(path)

    path = _write(tmp_path, "model: 3\n", "scalar.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at model"):
        load_config(path)


def test_wrong_type_in_set():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["epochs=2.5"])
    assert "--set epochs" in str(err.value) and "schedule.epochs expects int" in str(err.value)
    with pytest.raises(ConfigError, match="model.lrn_alpha expects float"):
        load_config(overrides=["lrn_alpha=high"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["lrn_alpha"])


@pytest.mark.parametrize("source", ["yaml", "set"])
def test_workers_below_one_names_scaling_workers(tmp_path, source):
    if source == "yaml":
        args = (_write(tmp_path, "scaling:\n  workers: 0\n"), ())
    else:
        args = (None, ["workers=0"])
    with pytest.raises(ConfigError) as err:
        load_config(*args)
    assert "scaling.workers" in str(err.value) and ">= 1" in str(err.value)


def test_range_checks():
    for override, key in (
        ("lr=0", "optim.lr"),
        ("dropout=1.0", "model.dropout"),
        ("lrn_window=4", "model.lrn_window"),
        ("schedule=cosine", "schedule.kind"),
        ("lambda=-1", "loss.detection_weight"),
        ("pretrain_share=1.0", "schedule.pretrain_share"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[override])
    with pytest.raises(ConfigError, match="schedule.epochs must be >= 2 for the pretrain"):
        load_config(overrides=["schedule=pretrain", "epochs=1"])


def test_lambda_alias():
    assert resolve_key(Config(), "lambda", "--set") == "loss.detection_weight"
    assert resolve_key(Config(), "schedule", "--set") == "schedule.kind"
    cfg = load_config(overrides=["lambda=0.3"])
    assert cfg.loss.detection_weight == 0.3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = _write(tmp_path, "model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_config_from_dict_round_trip():
    cfg = load_config(
        overrides=[
            "lrn_alpha=0.05",
            "schedule=pretrain",
            "epochs=6",
            "lambda=0.5",
            "val_subjects=S6,S7",
            "storage.uri=s3://bucket/prefix",
            "gpu=true",
        ]
    )
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert config_from_dict(json.loads(cfg.to_json())) == cfg  # through a checkpoint's config.json
    assert again is not cfg and again.data.val_subjects is not cfg.data.val_subjects


def test_config_from_dict_rejects_foreign_keys():
    d = Config().to_dict()
    d["model"]["conv4"] = 1
    with pytest.raises(ConfigError, match="checkpoint config.*model.conv4"):
        config_from_dict(d)


@pytest.mark.parametrize(
    "kind, epochs, share, expected",
    [
        ("joint", 10, 0.5, 0),
        ("pretrain", 10, 0.5, 5),
        ("pretrain", 10, 0.26, 3),  # round(2.6)
        ("pretrain", 2, 0.1, 1),  # at least one detection epoch
        ("pretrain", 4, 0.9, 3),  # at least one regression epoch
        ("pretrain", 3, 0.5, 2),  # round(1.5) = 2
    ],
)
def test_pretrain_epochs(kind, epochs, share, expected):
    cfg = load_config(overrides=[f"schedule={kind}", f"epochs={epochs}", f"pretrain_share={share}"])
    assert cfg.pretrain_epochs() == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2", (0, 2)),  # a fixed group: min_workers 0 means "not elastic"
        ("1:3", (1, 3)),  # elastic: at least 1, at most 3
        ("2:2", (2, 2)),  # elastic in form, fixed in effect
    ],
)
def test_parse_workers(text, expected):
    from raypose.config import parse_workers

    assert parse_workers(text, "--workers") == expected


@pytest.mark.parametrize("text", ["0", "3:1", "0:2", "a", "1:", "1.5"])
def test_parse_workers_refuses_in_one_line_naming_the_flag(text):
    from raypose.config import parse_workers

    with pytest.raises(ConfigError, match="^--workers must be"):
        parse_workers(text, "--workers")


def test_worker_range_and_elastic_settings():
    cfg = load_config(overrides=["workers=4"])
    assert cfg.worker_range() == (4, 4)
    cfg = load_config(overrides=["workers=4", "scaling.min_workers=2", "scaling.placement=SPREAD"])
    assert cfg.worker_range() == (2, 4)
    for bad, key in (
        ("scaling.min_workers=5", "scaling.min_workers"),
        ("scaling.placement=STRICT_PACK", "scaling.placement"),
        ("scaling.autoscaler_wait_s=-1", "scaling.autoscaler_wait_s"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=["workers=4", bad])


# --- hostile input: bounded messages, bounded YAML ------------------------------------------------

# A billion-laughs document: nine levels of nine-item lists, each level's items aliases of the
# level above it (the first one's are strings).  PyYAML loads its 342 bytes at once (each
# anchored list is built once and shared), and they expand to 9**9 strings in whatever walks
# the result: repr in an error message, json.dumps of the config.
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""
# the same in one flow collection, as a --set value
FLOW_BOMB = (
    "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], "
    + ", ".join(
        f"&{cur} [{','.join([f'*{prev}'] * 9)}]" for prev, cur in zip("abcdefgh", "bcdefghi")
    )
    + "]"
)


def test_billion_laughs_config_is_refused_fast_in_one_short_line(tmp_path):
    import time

    assert len(BOMB.encode()) == 342 and BOMB.count("*") == 72
    path = _write(tmp_path, BOMB, "bomb.yaml")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # measured against the minutes and gigabytes the expansion would take
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith(f"config file {path}: refused: it expands to more than 10000 values")
    assert "YAML aliases" in message and "\n" not in message and len(message) < 1024


def test_read_yaml_refuses_what_would_expand_past_its_bounds(tmp_path):
    from raypose.validate import YAML_MAX_ALIASES, YAML_MAX_NODES, read_yaml

    def read(text, name):
        return read_yaml(_write(tmp_path, text, name), "config file", ConfigError)

    # up to the bounds: a mapping, its key, a list and its items are each one value
    items = YAML_MAX_NODES - 3
    assert len(read("k: [" + ",".join(["1"] * items) + "]\n", "full.yaml")["k"]) == items
    with pytest.raises(
        ConfigError,
        match=f"full2.yaml: refused: it expands to more than {YAML_MAX_NODES} values; a config",
    ):
        read("k: [" + ",".join(["1"] * (items + 1)) + "]\n", "full2.yaml")
    shared = "x: &x 1\nk: [" + ",".join(["*x"] * YAML_MAX_ALIASES) + "]\n"
    assert read(shared, "aliases.yaml")["k"] == [1] * YAML_MAX_ALIASES
    with pytest.raises(
        ConfigError,
        match=f"aliases2.yaml: refused: it uses more than {YAML_MAX_ALIASES} YAML aliases",
    ):
        read(shared.replace("]", ",*x]"), "aliases2.yaml")
    with pytest.raises(
        ConfigError,
        match=r"self.yaml: refused: the YAML anchor on line 2 is used "
        r"inside itself",
    ):
        read("seed: 1\nk: &k [1, *k]\n", "self.yaml")
    with pytest.raises(
        ConfigError, match="deep.yaml: refused: its collections are nested too deeply"
    ):
        read("k: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")


def test_aliases_within_bounds_still_work(tmp_path):
    path = _write(
        tmp_path,
        "data:\n  val_subjects: &held [S7, S8]\n  batch_size: &b 16\nschedule: {epochs: *b}\n",
    )
    cfg = load_config(path)
    assert cfg.data.val_subjects == ["S7", "S8"] and cfg.schedule.epochs == 16


# Python's limit on converting long digit strings to int (3.11, and 3.10 from 3.10.7 on)
INT_DIGITS_LIMIT = hasattr(sys, "get_int_max_str_digits")


@pytest.mark.parametrize(
    "text, what",
    [
        (
            "seed: 2024-13-45\n",
            "month must be in 1..12",
        ),  # a date PyYAML matches, then cannot build
        pytest.param(
            "seed: " + "9" * 5000 + "\n",
            "4300 digits",
            marks=pytest.mark.skipif(not INT_DIGITS_LIMIT, reason="no int digits limit"),
        ),
    ],
)
def test_values_pyyaml_cannot_build_name_the_file(tmp_path, text, what):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path}: a value is not valid YAML (")
    assert what in message and len(message) < 1024


def test_set_values_are_loaded_within_the_same_bounds():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["nokey=" + FLOW_BOMB])
    message = str(err.value)
    assert message.startswith("--set nokey: refused: it expands to more than 10000 values")
    assert len(message) < 1024
    # text PyYAML cannot build is taken as typed, like any other text that is not YAML
    assert load_config(overrides=["storage.uri=2024-13-45"]).storage.uri == "2024-13-45"


def test_shown_and_clipped():
    from raypose.validate import clipped, shown

    assert shown("lr") == "'lr'" and shown(3) == "3" and shown(["a", 1]) == "['a', 1]"
    long = "x" * 100
    assert shown(long) == "'" + "x" * 79 + "... (102 characters)"
    assert shown(long, limit=102) == repr(long)
    assert shown(long, limit=10) == "'xxxxxxxxx... (102 characters)"
    assert clipped(long) == "x" * 80 + "... (100 characters)" and clipped("short") == "short"
    if INT_DIGITS_LIMIT:  # repr itself refuses such an int
        assert shown(10**5000) == "<int too large to show>"


HUGE = "z" * 100_000


@pytest.mark.parametrize(
    "text, overrides, culprit",
    [
        (f"seed: {HUGE}\n", (), "seed expects int"),
        (f"optim:\n  name: {HUGE}\n", (), "optim.name must be adam or sgd"),
        (f"model:\n  ? {HUGE}\n  : 1\n", (), "unknown key"),  # an explicit key: no length limit
        (None, [f"seed={HUGE}"], "seed expects int"),
        (None, [f"optim.name={HUGE}"], "optim.name must be adam or sgd"),
        (None, [f"{HUGE}=1"], "unknown key"),
        (None, [HUGE], "expected KEY=VALUE"),
        (None, [f"val_subjects=[[{HUGE}]]"], "data.val_subjects must list"),
    ],
)
def test_rejected_values_are_quoted_only_in_part(tmp_path, text, overrides, culprit):
    path = _write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    # an unknown key's message lists the ~50 known keys (~900 characters) on top
    assert culprit in message and len(message) < 2048, message[:3000]
    assert "z" * 100 not in message and "characters)" in message
    if path:
        assert str(path) in message


def test_parse_workers_quotes_a_long_value_in_part():
    from raypose.config import parse_workers

    with pytest.raises(ConfigError) as err:
        parse_workers("1:" + "9" * 5000, "--workers")
    assert str(err.value).startswith("--workers must be N or MIN:MAX") and len(str(err.value)) < 200
