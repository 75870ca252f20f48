"""`raypose tune --settings-of EXPERIMENT`: the best trial's searched values of a finished sweep
(its best.json, as a sweep writes it) become the base of every trial, --set still overrides them,
and anything but a finished sampled sweep is one line naming the flag, exit code 2, before Ray
starts. The config is built by the same function that `raypose tune` runs; no Ray is needed."""

import json
from pathlib import Path

import pytest

from raypose.cli import build_parser
from raypose.cli import main as cli_main
from raypose.config import ConfigError
from raypose.search.sweep import sweep_config

# the demo's best trial of 2026-12-06 (docs/benchmarks/2026-12-06-demo-test-rule.md), full precision
PARAMS = {
    "lrn_alpha": 0.001590344163502278,
    "lrn_beta": 0.7170621702601717,
    "schedule": "joint",
    "lambda": 0.0020384281313758864,
    "lr": 0.0006541674600100839,
}


def finished_sweep(root: Path, params=PARAMS) -> Path:
    """An experiment folder as a sampled sweep leaves it: best.json naming a checkpoint inside."""
    exp = root / "sweep"
    ckpt = exp / "train" / "trial_0" / "epoch_0004"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    best = {"trial_id": "6e02cbcf", "params": params, "checkpoint": str(ckpt), "value": 135.0}
    (exp / "best.json").write_text(json.dumps(best))
    return exp


def tune_args(tmp_path: Path, *extra: str):
    argv = [
        "tune",
        "--space",
        "search_spaces/seeds.yaml",
        "--data",
        str(tmp_path / "data"),
        "--storage",
        str(tmp_path / "experiments"),
        "--name",
        "seeds",
        *extra,
    ]
    return build_parser(argv).parse_args(argv), argv


def test_the_best_trials_values_become_the_base_config(tmp_path, capsys):
    exp = finished_sweep(tmp_path)
    args, _ = tune_args(tmp_path, "--settings-of", str(exp), "--epochs", "3")
    cfg, sources = sweep_config(args)
    # exactly the stored floats: nothing rounded on the way (the printed line rounds, cfg not)
    assert cfg.model.lrn_alpha == PARAMS["lrn_alpha"]
    assert cfg.model.lrn_beta == PARAMS["lrn_beta"]
    assert cfg.schedule.kind == "joint"
    assert cfg.loss.detection_weight == PARAMS["lambda"]
    assert cfg.optim.lr == PARAMS["lr"]
    assert cfg.schedule.epochs == 3
    assert "--settings-of" in sources["optim.lr"] and "best.json" in sources["optim.lr"]
    line = capsys.readouterr().out.strip()
    assert line.startswith("[raypose] settings of trial 6e02cbcf (") and "lr=0.0006542" in line


def test_set_overrides_the_best_trials_values(tmp_path):
    exp = finished_sweep(tmp_path)
    args, _ = tune_args(tmp_path, "--settings-of", str(exp), "--set", "lr=1.0e-3")
    cfg, sources = sweep_config(args)
    assert cfg.optim.lr == 1.0e-3 and sources["optim.lr"] == "--set lr=1.0e-3"
    assert cfg.loss.detection_weight == PARAMS["lambda"]  # the rest stays the best trial's


def test_without_the_flag_nothing_changes(tmp_path):
    args, _ = tune_args(tmp_path)
    cfg, _ = sweep_config(args)
    assert cfg.optim.lr == type(cfg.optim)().lr


def test_a_value_the_config_refuses_names_the_file_and_the_key(tmp_path):
    exp = finished_sweep(tmp_path, {**PARAMS, "lr": -1.0})
    args, _ = tune_args(tmp_path, "--settings-of", str(exp))
    with pytest.raises(ConfigError, match=r"--settings-of .*best\.json.*lr"):
        sweep_config(args)


def bad_experiments(tmp_path: Path) -> dict:
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text(json.dumps({"trials": []}))
    no_params = finished_sweep(tmp_path / "np", params={})
    ckpt = finished_sweep(tmp_path / "ck") / "train" / "trial_0" / "epoch_0004"
    return {
        "missing": (tmp_path / "nowhere", "does not exist"),
        "grid": (grid, "a grid sweep"),
        "checkpoint": (ckpt, "a checkpoint"),
        "no-params": (no_params, "no 'params'"),
    }


@pytest.mark.parametrize("case", ["missing", "grid", "checkpoint", "no-params"])
def test_anything_but_a_finished_sampled_sweep_is_one_line_and_exit_2(case, tmp_path, capsys):
    target, expected = bad_experiments(tmp_path)[case]
    storage = tmp_path / "experiments"
    _, argv = tune_args(tmp_path, "--settings-of", str(target))
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("raypose tune: error: --settings-of ") and expected in err[0]
    assert not storage.exists()  # refused before anything was written
