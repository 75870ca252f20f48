"""`raypose demo`, README's first command, as a real process on a small budget: the whole chain
runs, and everything it writes (data, experiments, report) lands under --root, none of it in
the folder it was started from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_writes_everything_under_its_root(tmp_path):
    root, cwd = tmp_path / "demo", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, RAYPOSE_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raypose.cli",
            "demo",
            "--root",
            str(root),
            "--samples",
            "2",
            "--epochs",
            "2",
            "--train",
            "120",
            "--test",
            "40",
            "--max-concurrent",
            "1",
            "--batch-size",
            "8",
            "--epoch-samples",
            "40",
            "--val-samples",
            "0",
        ],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # nothing written where it was started
    reports = list((root / "reports").glob("demo-*/report.md"))
    assert len(reports) == 1, sorted(str(p) for p in root.rglob("*"))[:40]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[raypose demo] test MPJPE ") for line in lines)
    assert f"[raypose demo] report: {reports[0]}" in lines
    assert {p.name for p in (root / "data").iterdir()} >= {"train.h5", "test.h5"}


# ----------------------------------------------------------------------------------------------
# --train is checked against the data it would render, before anything is rendered


def _demo_args(**overrides):
    from types import SimpleNamespace

    args = {"train": 8000, "test": 300, "epoch_samples": 1600, "batch_size": 16, "workers": 1}
    return SimpleNamespace(**{**args, **overrides})


def _split_counts(path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        subjects = f["subject"].asstr()[:].tolist()
    return {s: subjects.count(s) for s in sorted(set(subjects))}


def test_subject_counts_are_those_synthesize_writes(tiny_data, tmp_path):
    """demo's check predicts the split from synth.subject_counts; the files say the same."""
    from raypose.data.synth import TEST_SUBJECTS, TRAIN_SUBJECTS, subject_counts, synthesize

    assert _split_counts(tiny_data / "train.h5") == subject_counts(100, TRAIN_SUBJECTS)
    assert _split_counts(tiny_data / "test.h5") == subject_counts(40, TEST_SUBJECTS)
    synthesize(str(tmp_path), 7, 3, seed=5, progress=False)
    assert _split_counts(tmp_path / "train.h5") == {"S1": 2, "S5": 2, "S6": 1, "S7": 1, "S8": 1}
    assert subject_counts(7, TRAIN_SUBJECTS) == {"S1": 2, "S5": 2, "S6": 1, "S7": 1, "S8": 1}
    assert subject_counts(3, TRAIN_SUBJECTS)["S8"] == 0


@pytest.mark.parametrize(
    "flags, culprit, smallest",
    [
        ({"train": 3, "epoch_samples": 0}, "no sample of the validation subject S8", 19),
        (
            {"train": 4, "epoch_samples": 4, "batch_size": 1},
            "no sample of the validation subject S8",
            5,
        ),
        ({"train": 20, "epoch_samples": 0, "workers": 2}, "16 training samples", 39),
        ({"train": 50, "epoch_samples": 45}, "40 training samples", 56),
    ],
)
def test_demo_names_the_smallest_train_that_works(flags, culprit, smallest, tmp_path):
    """The refusal names --train and the smallest value that passes; that value's data, rendered
    for real here, holds the validation subject and fills an epoch, and one less does not pass."""
    import re

    from raypose.config import Config, ConfigError
    from raypose.data.synth import synthesize
    from raypose.demo import check_render

    args = _demo_args(**flags)
    with pytest.raises(ConfigError) as err:
        check_render(args, Config())
    message = str(err.value)
    assert (
        message.startswith(f"--train {args.train}: the synthetic train.h5 would hold ")
        and culprit in message
    )
    assert re.search(rf"give --train {smallest} or more \(nothing was written\)$", message), message
    check_render(_demo_args(**{**flags, "train": smallest}), Config())
    with pytest.raises(ConfigError):
        check_render(_demo_args(**{**flags, "train": smallest - 1}), Config())
    synthesize(str(tmp_path), smallest, 1, seed=0, progress=False)
    counts = _split_counts(tmp_path / "train.h5")
    training = sum(n for s, n in counts.items() if s != "S8")
    assert counts.get("S8", 0) >= 1
    assert training >= (args.epoch_samples or args.batch_size * args.workers)


def test_demo_refuses_a_small_train_before_writing_anything(tmp_path):
    """`raypose demo --train 3` as a real process: one line naming --train, exit code 2, and
    --root not even created (it rendered train.h5 and test.h5 before refusing, before the fix)."""
    root = tmp_path / "demo"
    env = dict(
        os.environ,
        RAYPOSE_LOG_DIR=str(tmp_path / "logs"),
        PYTHONPATH=str(REPO),
        RAY_TMPDIR=str(tmp_path / "ray"),
    )
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raypose.cli",
            "demo",
            "--root",
            str(root),
            "--train",
            "3",
            "--epoch-samples",
            "0",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [
        (
            "raypose demo: error: --train 3: the synthetic train.h5 would hold no sample "
            "of the validation subject S8 (the samples are spread evenly over S1, S5, S6, "
            "S7, S8); give --train 19 or more (nothing was written)"
        )
    ], proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no --root, no data, no Ray, no logs
