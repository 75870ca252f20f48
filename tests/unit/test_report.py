"""The sweep report (raypose report) on a best.json built by hand: no Ray, no training.

Checked: the numbers against hand-computed ones (best and median per schedule per epoch, the
verdict at the largest shared epoch, the ratios), the settings as --set flags and YAML that
rebuild the best trial's config, the files locally and in a moto S3 bucket, an older best.json
without the newer keys, and one clear error for each kind of bad input.
"""

import copy
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from raypose.cli import main as cli_main
from raypose.config import Config, apply_overrides, load_config
from raypose.evaluation import report
from raypose.evaluation.report import SweepReportError

PAPER = {"lrn_alpha": 0.0025, "lrn_beta": 0.75, "schedule": "joint", "lambda": 1.0, "lr": 3e-4}
BASELINE = 250.0


def _history(values, detection_epochs=0):
    """History rows: detection_epochs epochs without a regression head, then one val_mpjpe each."""
    rows = [
        {"epoch": e + 1, "val_mpjpe": None, "stage": "detection", "has_regression_head": False}
        for e in range(detection_epochs)
    ]
    for i, v in enumerate(values):
        stage = "regression" if detection_epochs else "joint"
        rows.append(
            {
                "epoch": detection_epochs + i + 1,
                "val_mpjpe": v,
                "stage": stage,
                "has_regression_head": True,
            }
        )
    return rows


def _trial(trial_id, schedule, state, history, params, is_paper=False, error=None):
    with_value = [h for h in history if h["val_mpjpe"] is not None]
    best = min(with_value, key=lambda h: h["val_mpjpe"]) if with_value else None
    return {
        "trial_id": trial_id,
        "params": {**params, "schedule": schedule},
        "state": state,
        "schedule": schedule,
        "is_paper_defaults": is_paper,
        "epochs": max([h["epoch"] for h in history] or [0]),
        "best_val_mpjpe": best["val_mpjpe"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "checkpoint_path": f"exp/{trial_id}/epoch_0004" if best else None,
        "stopped_early": state == "PRUNED",
        "epoch_seconds": 3.0 * len(history),
        "time_total_s": 4.0 * len(history),
        "error": error,
        "history": history,
    }


def make_best(experiment="s3://bucket/sweeps/hand") -> dict:
    """A best.json as the sweep driver writes it: 8 trials of 4 epochs, joint and pretrain (whose
    detection stage reports no val_mpjpe), three pruned, one error, one paper-defaults trial.

    val_mpjpe per epoch (- = no value):
        t0 joint    paper defaults  300 260 240 230   COMPLETE
        t1 joint                    280 220 200 190   COMPLETE  (best)
        t2 joint                    320 310           PRUNED
        t3 joint                    290 250 235 225   COMPLETE
        t4 pretrain                 -   270 230 210   COMPLETE
        t5 pretrain                 -   -   240 205   COMPLETE
        t6 pretrain                 -   330           PRUNED
        t7 pretrain                 -   -             ERROR
    """
    trials = [
        _trial(
            "t0", "joint", "COMPLETE", _history([300.0, 260.0, 240.0, 230.0]), PAPER, is_paper=True
        ),
        _trial(
            "t1",
            "joint",
            "COMPLETE",
            _history([280.0, 220.0, 200.0, 190.0]),
            {**PAPER, "lrn_alpha": 0.0123456789, "lr": 1.5e-5, "lambda": 1e-4},
        ),
        _trial("t2", "joint", "PRUNED", _history([320.0, 310.0]), {**PAPER, "lr": 5e-3}),
        _trial(
            "t3",
            "joint",
            "COMPLETE",
            _history([290.0, 250.0, 235.0, 225.0]),
            {**PAPER, "lrn_beta": 0.6},
        ),
        _trial(
            "t4",
            "pretrain",
            "COMPLETE",
            _history([270.0, 230.0, 210.0], 1),
            {"lrn_alpha": 0.01, "lrn_beta": 0.7, "pretrain_share": 0.25, "lr": 1e-4},
        ),
        _trial(
            "t5",
            "pretrain",
            "COMPLETE",
            _history([240.0, 205.0], 2),
            {"lrn_alpha": 0.02, "lrn_beta": 0.9, "pretrain_share": 0.5, "lr": 2e-4},
        ),
        _trial(
            "t6",
            "pretrain",
            "PRUNED",
            _history([330.0], 1),
            {"lrn_alpha": 0.05, "lrn_beta": 0.5, "pretrain_share": 0.3, "lr": 1e-3},
        ),
        _trial(
            "t7",
            "pretrain",
            "ERROR",
            [],
            {"lrn_alpha": 0.001, "lrn_beta": 0.8, "pretrain_share": 0.4, "lr": 1e-5},
            error="RayTaskError",
        ),
    ]
    best = trials[1]
    return {
        "experiment": experiment,
        "trial_id": "t1",
        "params": best["params"],
        "config": Config().to_dict(),
        "metric": "val_mpjpe",
        "mode": "min",
        "value": 190.0,
        "epoch": 4,
        "checkpoint": f"{experiment}/t1/epoch_0004",
        "study": {
            "url": "sqlite:////nowhere/optuna.db",
            "name": "hand",
            "copy": f"{experiment}/optuna.db",
        },
        "wall_seconds": 100.0,
        "share_in_epochs": 0.7,
        "val_mean_pose_mpjpe": BASELINE,
        "paper_defaults": {"trial_id": "t0", "params": trials[0]["params"], "value": 230.0},
        "trials": trials,
    }


def old_best(best: dict) -> dict:
    """The same sweep as an older best.json: none of the newer keys."""
    old = copy.deepcopy(best)
    for key in ("val_mean_pose_mpjpe", "paper_defaults"):
        old.pop(key)
    for row in old["trials"]:
        for key in ("state", "schedule", "is_paper_defaults", "history"):
            row.pop(key)
    return old


def check_png(path, min_colours=50):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert min(pixels.shape[:2]) >= 200 and pixels.std() > 5.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > min_colours


# ----------------------------------------------------------------------------------------------
# The numbers


def test_equal_epochs_table_by_hand():
    summary = report.summarise(make_best(), "s3://bucket/sweeps/hand")
    rows = {r["epoch"]: r for r in summary["equal_epochs"]["rows"]}
    assert sorted(rows) == [1, 2, 3, 4]
    # epoch 1: joint 300 280 320 290; pretrain has no regression head yet
    assert rows[1]["joint"] == {"best": 280.0, "median": 295.0, "count": 4}
    assert rows[1]["pretrain"] is None
    # epoch 2: joint 260 220 310 250 -> median (250 + 260) / 2; pretrain t4 270, t6 330 (pruned)
    assert rows[2]["joint"] == {"best": 220.0, "median": 255.0, "count": 4}
    assert rows[2]["pretrain"] == {"best": 270.0, "median": 300.0, "count": 2}
    # epoch 3: joint 240 200 235; pretrain 230 240
    assert rows[3]["joint"] == {"best": 200.0, "median": 235.0, "count": 3}
    assert rows[3]["pretrain"] == {"best": 230.0, "median": 235.0, "count": 2}
    # epoch 4: joint 230 190 225; pretrain 210 205
    assert rows[4]["joint"] == {"best": 190.0, "median": 225.0, "count": 3}
    assert rows[4]["pretrain"] == {"best": 205.0, "median": 207.5, "count": 2}

    eq = summary["equal_epochs"]
    assert eq["epoch"] == 4 and eq["winner"] == "joint"
    assert eq["margin_mm"] == pytest.approx(15.0)
    assert eq["margin_percent"] == pytest.approx(100 * 15.0 / 205.0)
    answer = eq["answer"]
    assert answer.startswith("At epoch 4, the largest epoch both schedules reached, joint won")
    for text in ("190.0 mm", "205.0 mm", "15.0 mm", "7.3 %", "225.0 vs 207.5 mm"):
        assert text in answer, text
    assert answer.count(".") >= 1 and "\n" not in answer


def test_pretrain_can_win_and_schedules_may_not_meet():
    best = make_best()
    best["trials"][5]["history"] = _history([240.0, 180.0], 2)  # t5 now ends at 180 mm
    eq = report.summarise(best, "x")["equal_epochs"]
    assert eq["winner"] == "pretrain" and eq["margin_mm"] == pytest.approx(10.0)
    assert "pretrain won" in eq["answer"]

    joint_only = make_best()
    joint_only["trials"] = joint_only["trials"][:4]
    eq = report.summarise(joint_only, "x")["equal_epochs"]
    assert eq["winner"] is None and eq["epoch"] is None
    assert "cannot be compared at equal epochs" in eq["answer"]
    assert "pretrain at 0" in eq["answer"]


def test_best_vs_paper_defaults_and_baseline():
    summary = report.summarise(make_best(), "x")
    bp = summary["best_vs_paper"]
    assert bp["best"]["trial_id"] == "t1" and bp["best"]["value"] == 190.0
    assert bp["best"]["schedule"] == "joint"
    assert bp["paper_defaults"]["trial_id"] == "t0" and bp["paper_defaults"]["value"] == 230.0
    assert bp["paper_defaults"]["params"]["lrn_alpha"] == 0.0025
    assert bp["ratio_best_to_paper"] == pytest.approx(190.0 / 230.0)
    assert bp["ratio_best_to_baseline"] == pytest.approx(190.0 / 250.0)
    assert bp["ratio_paper_to_baseline"] == pytest.approx(230.0 / 250.0)
    assert summary["counts"] == {
        "trials": 8,
        "COMPLETE": 5,
        "PRUNED": 2,
        "ERROR": 1,
        "joint": 4,
        "pretrain": 4,
    }
    assert summary["notes"] == []

    states = {t["trial_id"]: t["state"] for t in summary["trials"]}
    assert states == {
        "t0": "COMPLETE",
        "t1": "COMPLETE",
        "t2": "PRUNED",
        "t3": "COMPLETE",
        "t4": "COMPLETE",
        "t5": "COMPLETE",
        "t6": "PRUNED",
        "t7": "ERROR",
    }
    by_id = {t["trial_id"]: t for t in summary["trials"]}
    # the detection stage (val_mpjpe null, no regression head) is not part of the curve
    assert by_id["t5"]["curve"] == [[3, 240.0], [4, 205.0]]
    assert by_id["t7"]["curve"] == []
    assert [t["trial_id"] for t in summary["trials"] if t["is_best"]] == ["t1"]
    assert [t["trial_id"] for t in summary["trials"] if t["is_paper_defaults"]] == ["t0"]


def test_paper_defaults_trial_without_value():
    best = make_best()
    best["paper_defaults"]["value"] = None
    best["trials"][0].update(state="ERROR", error="RayTaskError", best_val_mpjpe=None, history=[])
    bp = report.summarise(best, "x")["best_vs_paper"]
    assert bp["paper_defaults"]["value"] is None and bp["ratio_best_to_paper"] is None
    assert bp["ratio_best_to_baseline"] == pytest.approx(0.76)
    best["paper_defaults"] = None
    for row in best["trials"]:
        row["is_paper_defaults"] = False
    summary = report.summarise(best, "x")
    assert summary["best_vs_paper"]["paper_defaults"] is None
    assert any("no trial with the paper's settings" in n for n in summary["notes"])
    assert "No paper-defaults trial" in report.markdown_section(summary)


def test_settings_rebuild_the_best_trials_config(tmp_path):
    best = make_best()
    st = report.summarise(best, "x")["settings"]
    assert st["set_flags"] == (
        "--set lrn_alpha=0.0123457 --set lrn_beta=0.75 --set schedule=joint "
        "--set lambda=0.0001 --set lr=1.5e-05"
    )
    assert st["yaml"] == (
        "loss:\n  detection_weight: 0.0001\nmodel:\n  lrn_alpha: 0.0123457\n"
        "  lrn_beta: 0.75\noptim:\n  lr: 1.5e-05\nschedule:\n  kind: joint\n"
    )
    from_flags = apply_overrides(
        Config(), [f.split(" ", 1)[1] for f in st["set_flags"].split(" --")]
    )
    (tmp_path / "best.yaml").write_text(st["yaml"])
    from_yaml = load_config(tmp_path / "best.yaml")
    for cfg in (from_flags, from_yaml):
        assert cfg.model.lrn_alpha == pytest.approx(0.0123456789, rel=5e-6)  # 6 significant digits
        assert cfg.model.lrn_beta == 0.75 and cfg.schedule.kind == "joint"
        assert cfg.loss.detection_weight == pytest.approx(1e-4) and cfg.optim.lr == pytest.approx(
            1.5e-5
        )


def test_older_best_json_falls_back_and_says_so():
    summary = report.summarise(old_best(make_best()), "x")
    states = [t["state"] for t in summary["trials"]]
    assert states == [
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
        "COMPLETE",
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
        "ERROR",
    ]
    assert [t["schedule"] for t in summary["trials"]] == ["joint"] * 4 + [
        "pretrain"
    ] * 4  # from params
    # without history a curve is the best epoch alone, and there is no comparison at equal epochs
    assert summary["trials"][4]["curve"] == [[4, 210.0]]
    assert summary["equal_epochs"]["rows"] == [] and summary["equal_epochs"]["winner"] is None
    bp = summary["best_vs_paper"]
    assert bp["paper_defaults"] is None and bp["ratio_best_to_baseline"] is None
    notes = " ".join(summary["notes"])
    for text in (
        "no 'state'",
        "no 'schedule'",
        "no per-epoch 'history'",
        "no 'paper_defaults'",
        "no 'val_mean_pose_mpjpe'",
    ):
        assert text in notes, text
    md = report.markdown_report(summary)
    assert "## Notes" in md and "cannot be compared at equal epochs" in md


def test_markdown_holds_every_section():
    summary = report.summarise(
        make_best(), "s3://bucket/sweeps/hand", {"lr": 0.6, "lrn_alpha": 0.4}
    )
    summary["figures"] = ["learning_curves.png", "param_importance.png"]
    md = report.markdown_report(summary)
    for text in (
        "# raypose sweep report",
        "![learning curves](learning_curves.png)",
        "## Joint vs pretrain at equal epochs",
        "| 4 | 190.0 | 225.0 | 3 | 205.0 | 207.5 | 2 |",
        "| 1 | 280.0 | 295.0 | 4 | - | - | 0 |",
        "## Best trial vs paper defaults",
        "best / paper defaults: 0.826",
        "| best | t1 | joint | 190.0 | 0.760 |",
        "| paper defaults | t0 | joint | 230.0 | 0.920 |",
        "## Parameter importances",
        "| lr | 0.600 |",
        "## Settings to use",
        "raypose train --set lrn_alpha=0.0123457",
        "```yaml",
        "## Trials",
        "| t1 (best) | COMPLETE | joint | 4 | 190.0 | 4 |",
        "| t0 (paper defaults) | COMPLETE |",
        "| t7 | ERROR: RayTaskError | pretrain | 0 | - | - |",
        "| t2 | PRUNED | joint | 2 | 310.0 | 2 |",
    ):
        assert text in md, text
    assert "## Notes" not in md


# ----------------------------------------------------------------------------------------------
# The job: files locally and in S3, errors


def test_report_of_an_experiment_in_s3(s3_bucket, tmp_path, capsys):
    import s3fs

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    experiment = f"{bucket}/sweeps/hand"
    best = make_best(f"s3://{experiment}")
    fs.pipe(f"{experiment}/best.json", json.dumps(best).encode())
    out = tmp_path / "out"
    rc = cli_main(["report", f"s3://{experiment}", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "joint won" in printed and str(out.resolve() / "sweep_report.md") in printed

    assert sorted(p.name for p in out.iterdir()) == sorted(report.OUTPUT_FILES)
    check_png(out / "learning_curves.png", min_colours=200)
    check_png(out / "param_importance.png", min_colours=10)
    summary = json.loads((out / "sweep_report.json").read_text())
    assert summary["equal_epochs"]["winner"] == "joint"
    assert summary["best_vs_paper"]["ratio_best_to_paper"] == pytest.approx(190.0 / 230.0)
    assert summary["figures"] == ["learning_curves.png", "param_importance.png"]
    # no study copy: the importances say why
    assert (
        summary["importances"] == {}
        and f"s3://{experiment}/optuna.db" in summary["importance_note"]
    )

    remote = summary["outputs"]["storage"]
    assert remote.startswith(f"s3://{experiment}/sweep-report-")
    fs.invalidate_cache()
    stored = {p.rsplit("/", 1)[-1] for p in fs.ls(remote[len("s3://") :], detail=False)}
    assert stored == set(report.OUTPUT_FILES)
    for name in report.OUTPUT_FILES:
        assert fs.cat(f"{remote[len('s3://') :]}/{name}") == (out / name).read_bytes(), name
    assert json.loads(fs.cat(f"{experiment}/best.json")) == best  # best.json untouched

    # a second report: a fresh storage folder, and the same --out is refused
    out2 = tmp_path / "out2"
    second = report.sweep_report(f"s3://{experiment}", str(out2))
    assert second["outputs"]["storage"] != remote
    with pytest.raises(SweepReportError, match="sweep_report.md already exists"):
        report.sweep_report(f"s3://{experiment}", str(out2))


def test_report_with_study_copy_has_importances(tmp_path):
    from tests.local_ray.test_evaluate import make_study

    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "best.json").write_text(json.dumps(make_best(str(experiment))))
    make_study(experiment / "optuna.db", "hand")
    # two reads of the test split recorded in the experiment's ledger (raypose evaluate writes it)
    from raypose import storage
    from raypose.storage.experiment import LEDGER_FILE, record_test_read

    for checkpoint in ("a", "b"):
        record_test_read(
            storage.parse(str(experiment)).join(LEDGER_FILE), {"checkpoint": checkpoint}
        )
    summary = report.sweep_report(str(experiment), str(tmp_path / "out"))
    assert set(summary["importances"]) == {"lrn_alpha", "lr", "schedule"}
    assert summary["importance_note"] is None
    assert summary["test_reads"] == 2
    assert "| lr |" in (tmp_path / "out" / "sweep_report.md").read_text()
    assert (
        "Test split reads recorded for this experiment: 2."
        in (tmp_path / "out" / "sweep_report.md").read_text()
    )
    check_png(tmp_path / "out" / "param_importance.png")
    stored = [p for p in experiment.iterdir() if p.name.startswith("sweep-report-")]
    assert len(stored) == 1 and sorted(p.name for p in stored[0].iterdir()) == sorted(
        report.OUTPUT_FILES
    )


def test_older_best_json_gives_a_report(tmp_path):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "best.json").write_text(json.dumps(old_best(make_best(str(experiment)))))
    summary = report.sweep_report(str(experiment), str(tmp_path / "out"))
    assert "learning_curves.png" in summary["figures"]
    check_png(tmp_path / "out" / "learning_curves.png")
    assert "## Notes" in (tmp_path / "out" / "sweep_report.md").read_text()


NO_PARAMS = {**make_best(), "trials": [{"trial_id": "t0", "best_val_mpjpe": 1.0}]}
BAD_INPUT = {  # case: (best.json bytes or None for none, text the message must hold)
    "missing best.json": (None, "no best.json"),
    "not JSON": (b"{'trials': [", "is not JSON"),
    "not an object": (b"[1, 2]", "expected a JSON object"),
    "missing trials": (
        json.dumps({k: v for k, v in make_best().items() if k != "trials"}).encode(),
        "has no 'trials' key",
    ),
    "trial without params": (json.dumps(NO_PARAMS).encode(), "trials[0] has no 'params' key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_clear_error(tmp_path, capsys, case):
    content, needle = BAD_INPUT[case]
    experiment = tmp_path / f"exp-{uuid.uuid4().hex[:6]}"
    experiment.mkdir()
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    if content is not None:
        (experiment / "best.json").write_bytes(content)
    before = sorted(p.name for p in experiment.iterdir())
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli_main(["report", str(experiment), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("raypose report: error: ") and needle in err[0], err[0]
    assert str(experiment) in err[0]
    assert not out.exists() and sorted(p.name for p in experiment.iterdir()) == before


def test_a_checkpoint_or_nothing_is_not_an_experiment(tmp_path):
    ckpt = tmp_path / "run" / "epoch_0001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    with pytest.raises(SweepReportError, match="is a checkpoint, not an experiment"):
        report.sweep_report(str(ckpt), str(tmp_path / "out"))
    from raypose.evaluation.evaluate import EvaluationError

    with pytest.raises(EvaluationError, match="does not exist"):
        report.sweep_report(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
