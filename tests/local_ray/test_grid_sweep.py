"""The paper's protocol end to end on a local Ray instance: one network per action (a grid sweep
over train.h5's actions) trained on every training subject, then each action's network tested on
that action's own test samples, every test read in the experiment's ledger."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def raypose(*args, tmp_path, timeout=900):
    env = dict(os.environ, RAYPOSE_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "raypose.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_one_network_per_action_on_every_subject_then_per_action_test_rows(tiny_data, tmp_path):
    with h5py.File(tiny_data / "train.h5") as f:
        actions = sorted(set(f["action"].asstr()[:].tolist()))
        train_subjects = sorted(set(f["subject"].asstr()[:].tolist()))
    with h5py.File(tiny_data / "test.h5") as f:
        test_counts = {
            a: int(n) for a, n in zip(*np.unique(f["action"].asstr()[:], return_counts=True))
        }
    sweep = raypose(
        "tune",
        "--space",
        str(REPO / "search_spaces" / "per_action.yaml"),
        "--data",
        str(tiny_data),
        "--storage",
        str(tmp_path / "exp"),
        "--name",
        "per-action",
        "--epochs",
        "1",
        "--workers-per-trial",
        "1",
        "--set",
        "data.val_subjects=[]",
        "--set",
        "data.batch_size=4",
        tmp_path=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    out = sweep.stdout
    assert f"sweep per-action: {len(actions)} trials of 1 epochs" in out, out[-3000:]
    assert "a grid over data.actions: " + ", ".join(actions) in out
    # no validation split: the epoch lines say so, and the trials still finish
    epoch_lines = [line for line in out.splitlines() if " epoch 1/1 " in line]
    assert len(epoch_lines) == len(actions) and all(
        "no validation split" in line for line in epoch_lines
    )
    record = json.loads((tmp_path / "exp" / "per-action" / "grid.json").read_text())
    assert not (tmp_path / "exp" / "per-action" / "best.json").exists()  # nothing was chosen
    # the grid's Tune state is a pickle Tune reads back on --resume: it is sealed as the others
    states = list((tmp_path / "exp" / "per-action").glob("basic-variant-state-*.json"))
    assert states and all(Path(f"{p}.raypose-seal").exists() for p in states)
    assert sorted(t["params"]["data.actions"] for t in record["trials"]) == actions
    assert all(
        t["checkpoint_is"] == "the last epoch's" and t["epochs"] == 1 for t in record["trials"]
    )
    # every trial trained on every subject of train.h5 (val_subjects=[]), on its own action only
    for trial in record["trials"]:
        config = json.loads((Path(trial["checkpoint"]) / "config.json").read_text())
        assert config["data"]["val_subjects"] == [] and config["data"]["actions"] == [
            trial["params"]["data.actions"]
        ]
    assert train_subjects  # the tiny data has several subjects, S8 among them
    assert "S8" in train_subjects

    evaluation = raypose(
        "evaluate",
        str(tmp_path / "exp" / "per-action"),
        "--out",
        str(tmp_path / "eval"),
        tmp_path=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "grid_report.json").read_text())
    rows = {r["action"]: r for r in summary["per_action"]}
    assert sorted(rows) == actions
    for action, row in rows.items():
        # each action's network is tested on that action's test samples alone
        assert row["test_samples"] == test_counts[action]
        assert 0 < row["mpjpe"] < 2000 and row["mpjpe_sd"] >= 0
    # each read of the test split is in the experiment's ledger
    ledger = json.loads((tmp_path / "exp" / "per-action" / "test_reads.json").read_text())
    assert len(ledger) == len(actions) == summary["test_reads"]
    assert sorted(e["actions"][0] for e in ledger) == actions
    text = (tmp_path / "eval" / "grid_report.md").read_text()
    assert "One network per action" in text and "figures are not shown" in text  # synthetic data
    assert "DconvMP" not in text
    assert f"the test split has been read {len(actions)} time(s)" in evaluation.stdout
