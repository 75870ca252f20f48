"""`raypose demo`, README's first command, as a real process on a small budget: the whole chain
runs, and everything it writes (data, experiments, report) lands under --root, none of it in
the folder it was started from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_writes_everything_under_its_root(tmp_path):
    root, cwd = tmp_path / "demo", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, RAYPOSE_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "raypose.cli", "demo", "--root", str(root), "--samples", "2",
         "--epochs", "2", "--train", "120", "--test", "40", "--max-concurrent", "1",
         "--batch-size", "8", "--epoch-samples", "40", "--val-samples", "0"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # nothing written where it was started
    reports = list((root / "reports").glob("demo-*/report.md"))
    assert len(reports) == 1, sorted(str(p) for p in root.rglob("*"))[:40]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[raypose demo] test MPJPE ") for line in lines)
    assert f"[raypose demo] report: {reports[0]}" in lines
    assert {p.name for p in (root / "data").iterdir()} >= {"train.h5", "test.h5"}
