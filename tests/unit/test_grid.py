"""Grid sweeps (one network per action, one setting over seeds) and the test-split ledger:
the space format, the pooled results with hand-computed numbers, and the files in storage."""

import json

import numpy as np
import pytest

from raypose import storage
from raypose.evaluation import grid
from raypose.search.space import SearchSpaceError, parse_space
from raypose.storage.experiment import (
    EvaluationError,
    ledger_location,
    read_grid,
    read_ledger,
    record_test_read,
    write_grid,
)


def test_a_grid_space_lists_its_combinations_and_refuses_mixing():
    space = parse_space(
        {
            "parameters": {
                "data.actions": {"distribution": "grid", "values": "actions"},
                "seed": {"distribution": "grid", "values": [0, 1, 2]},
                "lr": {"distribution": "fixed", "value": 5.0e-4},
            }
        },
        "s.yaml",
    )
    assert space.is_grid
    assert space.grid(["sit", "walk"]) == {"data.actions": ["sit", "walk"], "seed": [0, 1, 2]}
    assert space.fixed() == {"lr": 5.0e-4}
    # a trial's action lands on the config as a one-action list
    assert space.apply({"data.actions": "sit", "seed": 1}).data.actions == ["sit"]

    with pytest.raises(SearchSpaceError, match="parameters.lr: a space with a grid parameter"):
        parse_space(
            {
                "parameters": {
                    "seed": {"distribution": "grid", "values": [0, 1]},
                    "lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-3},
                }
            },
            "s.yaml",
        )
    with pytest.raises(SearchSpaceError, match="only for data.actions"):
        parse_space({"parameters": {"seed": {"distribution": "grid", "values": "actions"}}})
    with pytest.raises(SearchSpaceError, match=r"values\[1\] 0 appears twice"):
        parse_space({"parameters": {"seed": {"distribution": "grid", "values": [0, 0]}}})
    with pytest.raises(SearchSpaceError, match="takes no condition"):
        parse_space(
            {
                "parameters": {
                    "schedule": {"distribution": "fixed", "value": "joint"},
                    "seed": {
                        "distribution": "grid",
                        "values": [0, 1],
                        "condition": {"schedule": "joint"},
                    },
                }
            }
        )
    with pytest.raises(SearchSpaceError, match="seed"):  # the config's own type check
        parse_space({"parameters": {"seed": {"distribution": "grid", "values": ["x"]}}})


def test_sample_errors_are_the_per_sample_mpjpe():
    gt = np.zeros((2, 17, 3))
    pred = np.zeros((2, 17, 3))
    pred[0, 1:, 0] = 17.0  # 16 joints off by 17 mm, the root exact: mean 16 mm
    pred[1, 1:, 2] = -34.0  # 32 mm
    assert grid.sample_errors(pred, gt).tolist() == pytest.approx([16.0, 32.0])


def _row(trial_id, params, mean, baseline=200.0, errors=(10.0, 20.0)):
    errors = np.asarray(errors)
    report = {
        "mean_over_actions": {"mpjpe": mean},
        "mean_pose_baseline": {"mean_over_actions": baseline},
        "per_action": {"walk": {"mpjpe": mean}},
    }
    trial = {"trial_id": trial_id, "params": params, "checkpoint": f"/x/{trial_id}"}
    return grid.trial_row(trial, report, errors)


def test_seeds_pool_into_mean_and_sample_sd():
    rows = [
        _row("a", {"seed": 0, "lr": 1}, 100.0),
        _row("b", {"seed": 1, "lr": 1}, 110.0),
        _row("c", {"seed": 2, "lr": 1}, 120.0),
        _row("d", {"seed": 0, "lr": 2}, 90.0, baseline=210.0),
    ]
    pooled = grid.pooled_over_seeds(rows)
    assert len(pooled) == 2
    lr1 = next(p for p in pooled if p["params"] == {"lr": 1})
    # mean 110; sample sd of 100, 110, 120 = sqrt((100 + 0 + 100) / 2) = 10
    assert lr1["mean"] == pytest.approx(110.0)
    assert lr1["sd"] == pytest.approx(10.0)
    assert lr1["runs"] == 3 and lr1["seeds"] == [0, 1, 2]
    lr2 = next(p for p in pooled if p["params"] == {"lr": 2})
    assert lr2["sd"] is None and lr2["mean_pose_baseline"] == 210.0
    # the per-sample spread of one trial: errors 10 and 20 -> mean 15, population sd 5
    assert rows[0]["mpjpe"] == 15.0 and rows[0]["mpjpe_sd"] == 5.0


def test_per_action_rows_and_paper_columns_only_for_human36m():
    rows = [
        _row("a", {"data.actions": ["Walking"]}, 80.0, errors=(70.0, 90.0)),
        _row("b", {"data.actions": "Eating"}, 100.0, errors=(100.0,)),
    ]
    per_action = grid.per_action_rows(rows, "data.actions")
    assert [(r["action"], r["mpjpe"], r["mpjpe_sd"]) for r in per_action] == [
        ("Walking", 80.0, 10.0),
        ("Eating", 100.0, 0.0),
    ]
    summary = {
        "experiment": "/e",
        "data": "/d",
        "data_source": "synth",
        "grid": {"data.actions": ["Walking", "Eating"]},
        "trials": rows,
        "settings": grid.pooled_over_seeds(rows),
        "per_action": per_action,
        "paper": None,
        "test_reads": 2,
    }
    text = grid.markdown(summary)
    assert "| Walking | 80.00 (10.00) | 200.00 | 2 |" in text
    assert "Mean over actions: 90.00 mm." in text
    assert "figures are not shown" in text and "DconvMP" not in text
    summary["data_source"] = "h36m"
    summary["paper"] = {"DconvMP-HML": {"Walking": 77.6, "Eating": None}}
    text = grid.markdown(summary)
    assert "| Walking | 80.00 (10.00) | 200.00 | 2 | 77.60 |" in text
    assert "| Eating | 100.00 (0.00) | 200.00 | 1 | - |" in text
    assert "not shown" not in text


def test_the_report_names_the_setting_a_seeds_grid_retrains():
    """base_settings: what every trial shares and differs from the defaults, without the grid's
    own parameter (the seed), the run names or the data's path; the report prints it."""
    from raypose.config import Config, set_value

    configs = []
    for seed in (0, 1, 2):
        cfg = Config()
        for key, value in (
            ("seed", seed),
            ("optim.lr", 6.4e-4),
            ("loss.detection_weight", 0.005),
            ("optim.lr_schedule", "cosine"),
            ("schedule.kind", "joint"),  # the default: not part of what the report names
            ("data.path", f"/data/{seed}"),
            ("storage.name", f"exp/train/trial_{seed}"),
        ):
            set_value(cfg, key, value, "test")
        configs.append(cfg.to_dict())
    base = grid.base_settings(configs)
    assert base == {
        "loss.detection_weight": 0.005,
        "optim.lr": 6.4e-4,
        "optim.lr_schedule": "cosine",
    }
    rows = [_row(str(s), {"seed": s}, 90.0 + s) for s in (0, 1, 2)]
    summary = {
        "experiment": "/e",
        "data": "/d",
        "data_source": "synth",
        "grid": {"seed": [0, 1, 2]},
        "base_settings": base,
        "trials": rows,
        "settings": grid.pooled_over_seeds(rows),
        "per_action": None,
        "paper": None,
        "test_reads": 3,
    }
    text = grid.markdown(summary)
    assert (
        "Base config, where every trial differs from raypose's defaults: "
        "`loss.detection_weight=0.005`, `optim.lr=0.00064`, `optim.lr_schedule=cosine`." in text
    )
    assert "| (base config) | 3 | 0, 1, 2 | 91.00 (1.00) |" in text
    assert grid.base_settings([Config().to_dict()]) == {}


def test_the_ledger_counts_every_read_in_order(tmp_path):
    exp = storage.parse(str(tmp_path / "exp"))
    ckpt = exp.join("train", "t1", "epoch_0002")
    ledger = ledger_location(ckpt, exp)
    assert ledger.path == exp.join("test_reads.json").path
    # a checkpoint of a plain run: the run's folder holds its ledger
    run_ledger = ledger_location(ckpt, None)
    assert run_ledger.path == exp.join("train", "t1", "test_reads.json").path
    assert read_ledger(ledger) == []
    assert record_test_read(ledger, {"checkpoint": ckpt.uri, "test_samples": 40}) == 1
    assert record_test_read(ledger, {"checkpoint": "other", "test_samples": 40}) == 2
    entries = read_ledger(ledger)
    assert [e["checkpoint"] for e in entries] == [ckpt.uri, "other"]
    assert all(e["time"].endswith("+00:00") for e in entries)
    (tmp_path / "exp" / "test_reads.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="test_reads.json is not JSON"):
        record_test_read(ledger, {})


def test_grid_json_may_only_name_checkpoints_inside_its_experiment(tmp_path):
    exp = storage.parse(str(tmp_path / "exp"))
    (tmp_path / "exp").mkdir()
    inside = exp.join("train", "t1", "epoch_0001").uri
    write_grid(exp, {"trials": [{"trial_id": "t1", "params": {}, "checkpoint": inside}]})
    assert read_grid(exp)["trials"][0]["checkpoint"] == inside
    for outside in ("/etc", str(tmp_path / "other" / "epoch_0001"), 7):
        write_grid(exp, {"trials": [{"trial_id": "t1", "params": {}, "checkpoint": outside}]})
        with pytest.raises(EvaluationError, match="is not inside the experiment"):
            read_grid(exp)
    (tmp_path / "exp" / "grid.json").write_text(json.dumps({"trials": "x"}))
    with pytest.raises(EvaluationError, match="no 'trials' list"):
        read_grid(exp)


def test_a_grid_sweep_pools_validation_over_seeds():
    from raypose.search.sweep import validation_over_seeds

    trials = [
        {"params": {"seed": 0, "optim.lr_schedule": "cosine"}, "best_val_mpjpe": 130.0},
        {"params": {"seed": 1, "optim.lr_schedule": "cosine"}, "best_val_mpjpe": 134.0},
        {"params": {"seed": 0, "optim.lr_schedule": "constant"}, "best_val_mpjpe": 140.0},
        {"params": {"seed": 1, "optim.lr_schedule": "constant"}, "best_val_mpjpe": None},
    ]
    pooled = validation_over_seeds(trials)
    cosine = next(g for g in pooled if g["params"] == {"optim.lr_schedule": "cosine"})
    # mean 132; sample sd of 130 and 134: sqrt((4 + 4) / 1) = 2.83
    assert cosine["mean"] == 132.0 and cosine["sd"] == pytest.approx(8**0.5)
    constant = next(g for g in pooled if g["params"] == {"optim.lr_schedule": "constant"})
    assert (
        constant["runs"] == 1 and constant["sd"] is None
    )  # the trial without validation is left out


def test_a_grid_without_any_checkpoint_is_refused_in_one_line(tmp_path):
    from raypose.evaluation.evaluate import evaluate_grid

    exp = storage.parse(str(tmp_path / "exp"))
    (tmp_path / "exp").mkdir()
    write_grid(exp, {"grid": {"seed": [0]}, "trials": [{"trial_id": "t", "params": {}}]})
    with pytest.raises(EvaluationError, match="grid.json names no trial with a checkpoint"):
        evaluate_grid(exp, None, str(tmp_path / "out"), False, 8, False)
    assert not (tmp_path / "out").exists()  # nothing was written


def test_the_sweep_report_of_a_grid_points_at_evaluate(tmp_path):
    from raypose.evaluation.report import SweepReportError, read_best

    exp = storage.parse(str(tmp_path / "exp"))
    (tmp_path / "exp").mkdir()
    write_grid(exp, {"grid": {"seed": [0]}, "trials": []})
    with pytest.raises(SweepReportError, match="is a grid sweep .* `raypose evaluate"):
        read_best(str(tmp_path / "exp"))
