"""Bad input, tried as a new user would: every command answers with one line on stderr that names
the flag, key or file, exit code 2, before Ray starts, quickly, and without touching anything
that was already written.

The table below runs each case in-process through raypose.cli.main (the entry point `raypose`
and jobs/*.py both call); a few run as real subprocesses to show the exit code and stderr a shell
sees.  Everything is real: HDF5 files made with h5py (and one cut in half), bytes that are not
UTF-8, loopback TCP sockets that accept and never answer, ports where nothing listens.
"""

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from raypose import cli
from raypose.validate import NAME_PATTERN, InputError, check_name, ray_address
from tests.tcp_proxy import close_listener

REPO = Path(__file__).resolve().parents[2]
SMOKE_SPACE = REPO / "search_spaces" / "smoke.yaml"
# The workspace fixture imports every command's modules first, so the time measured is the
# command's own.  Every case then fails in checks that read a few small local files; the only
# waits are on sockets, and the tests set those timeouts to 1 s.  On this 2-core machine the
# slowest (one S3 check of at most ~2.5 check timeouts) takes 2.3 s; 10 s leaves room for a
# loaded machine and is far below the minute a hang would take.
IN_PROCESS_BOUND_S = 10.0
# a subprocess also imports numpy, h5py, torch and botocore: about 5 s here under load
SUBPROCESS_BOUND_S = 30.0
SHORT_TIMEOUTS = {"RAYPOSE_S3_CHECK_TIMEOUT": "1", "RAYPOSE_RAY_CONNECT_TIMEOUT": "1"}


# ----------------------------------------------------------------------------------------------
# sockets: one that accepts and never answers, one port where nothing listens


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        close_listener(self.sock)
        for conn in self.held:
            conn.close()


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# the workspace: real files of every kind the cases need, made once


def _write_yaml_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    # imported here, not timed in the cases: torch, h5py, botocore and Ray's Python modules (which
    # train's resume check imports without starting anything) take seconds to import
    import ray.train  # noqa: F401

    import raypose.demo  # noqa: F401
    import raypose.evaluation.evaluate  # noqa: F401
    import raypose.evaluation.report  # noqa: F401
    import raypose.search.sweep  # noqa: F401
    import raypose.train.bench  # noqa: F401
    import raypose.train.run  # noqa: F401
    from raypose.data.synth import synthesize

    root = tmp_path_factory.mktemp("bad_input")
    p = {"root": str(root)}
    data = root / "dataset"
    # S1..S8 train, S9 S11 test; 80 training samples besides S8's: at least one step of the
    # default batch of 64, so that a case fails on its own culprit, not on an empty epoch
    synthesize(str(data), 100, 10, seed=0, progress=False)
    p["data"] = str(data)
    (root / "storage").mkdir()
    p["storage"] = str(root / "storage")
    p["file"] = _write_yaml_bytes(root / "notes.txt", b"just a text file\n")
    p["missing"] = str(root / "does-not-exist")
    p["new"] = str(root / "new-output")
    p["empty_dir"] = str(root / "empty")
    (root / "empty").mkdir()
    # an HDF5 file cut in half: its superblock is intact, the rest is gone
    trunc = root / "truncated"
    trunc.mkdir()
    blob = (data / "train.h5").read_bytes()
    (trunc / "train.h5").write_bytes(blob[: len(blob) // 2])
    (trunc / "test.h5").write_bytes(blob[: len(blob) // 2])
    p["truncated"] = str(trunc)
    p["truncated_h5"] = str(trunc / "train.h5")
    # a real HDF5 file of another schema
    with h5py.File(root / "foreign.h5", "w") as f:
        f["foo"] = np.zeros(3)
    p["foreign_h5"] = str(root / "foreign.h5")
    import sqlite3

    foreign_db = sqlite3.connect(root / "accounts.db")  # another application's database
    foreign_db.execute("CREATE TABLE accounts (id INTEGER)")
    foreign_db.commit()
    foreign_db.close()
    p["foreign_db"] = str(root / "accounts.db")
    p["png"] = str(root / "samples.png")
    (root / "samples.png").write_bytes(b"\x89PNG\r\n\x1a\n not really, but it exists")
    p["nonutf8"] = _write_yaml_bytes(
        root / "latin1.yaml", "optim:\n  name: 'adam'  # r\xe9glage\n".encode("latin-1")
    )
    p["badyaml"] = _write_yaml_bytes(root / "bad.yaml", b"optim:\n  lr: 0.1\n   name: adam\n")
    p["unknown_key"] = _write_yaml_bytes(root / "unknown.yaml", b"optim:\n  learning_rate: 0.1\n")
    p["inf_lr"] = _write_yaml_bytes(root / "inf.yaml", b"optim:\n  lr: .inf\n")
    p["bad_metric"] = _write_yaml_bytes(
        root / "metric.yaml",
        SMOKE_SPACE.read_bytes().replace(b"metric: val_mpjpe", b"metric: accuracy"),
    )
    p["space_nonutf8"] = _write_yaml_bytes(
        root / "space-latin1.yaml", SMOKE_SPACE.read_bytes() + "# \xe9\n".encode("latin-1")
    )
    p["space"] = str(SMOKE_SPACE)
    # an experiment folder whose best.json is not JSON, and earlier reports in --out folders
    exp = root / "experiment"
    exp.mkdir()
    (exp / "best.json").write_text("{not json")
    p["exp"] = str(exp)
    # experiments whose best.json names a checkpoint outside them: another folder of this
    # workspace (which would be read, and written next to), and a '..' path
    for name, checkpoint in (("exp_outside", str(data)), ("exp_dotdot", "../dataset")):
        folder = root / name
        (folder / "train").mkdir(parents=True)
        (folder / "best.json").write_text(json.dumps({"trial_id": "t1", "checkpoint": checkpoint}))
        p[name] = str(folder)
    # a billion-laughs config and search space (342 bytes, 9**9 strings once expanded)
    bomb = b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + b"".join(
        f"{cur}: &{cur} [{','.join([f'*{prev}'] * 9)}]\n".encode()
        for prev, cur in zip("abcdefgh", "bcdefghi")
    )
    p["bomb"] = _write_yaml_bytes(root / "bomb.yaml", bomb)
    report = root / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    p["report_dir"] = str(report)
    sweep_report = root / "sweep-report"
    sweep_report.mkdir()
    (sweep_report / "sweep_report.md").write_text("# earlier\n")
    p["sweep_report_dir"] = str(sweep_report)
    # a demo root holding only one split: rendering would replace it
    half = root / "half-demo" / "data"
    half.mkdir(parents=True)
    (half / "train.h5").write_bytes((data / "train.h5").read_bytes())
    p["half_root"] = str(root / "half-demo")
    p["h36m_root"] = str(root / "h36m")
    (root / "h36m").mkdir()
    test_only = root / "test-only"
    test_only.mkdir()
    (test_only / "test.h5").write_bytes((data / "test.h5").read_bytes())
    p["test_only"] = str(test_only)
    silent = SilentServer()
    p["silent"] = f"127.0.0.1:{silent.port}"
    p["closed"] = f"127.0.0.1:{closed_port()}"
    yield p
    silent.close()


def snapshot(root: str) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            stat = path.stat()
            out[str(path.relative_to(root))] = (
                stat.st_size,
                stat.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


# ----------------------------------------------------------------------------------------------
# the table: (id, argv, what stderr must name, extra environment)

TRAIN = ["train", "--data", "{data}", "--storage", "{storage}", "--name", "run1", "--epochs", "1"]
TUNE = ["tune", "--space", "{space}", "--data", "{data}", "--storage", "{storage}", "--name", "s1"]
S3_SILENT = {"AWS_ENDPOINT_URL": "http://{silent}"}
S3_CLOSED = {"AWS_ENDPOINT_URL": "http://{closed}"}
S3_PORT_99999 = {"AWS_ENDPOINT_URL": "http://127.0.0.1:99999"}

CASES = [
    # data synth
    ("synth-out-is-file", ["data", "synth", "--out", "{file}"], "--out", {}),
    ("synth-out-under-file", ["data", "synth", "--out", "{file}/sub"], "--out", {}),
    ("synth-existing-dataset", ["data", "synth", "--out", "{data}", "--train", "5"], "--force", {}),
    ("synth-train-zero", ["data", "synth", "--out", "{new}", "--train", "0"], "--train", {}),
    ("synth-train-not-int", ["data", "synth", "--out", "{new}", "--train", "ten"], "--train", {}),
    ("synth-seed-negative", ["data", "synth", "--out", "{new}", "--seed", "-1"], "--seed", {}),
    (
        "synth-unknown-flag",
        ["data", "synth", "--out", "{new}", "--frames", "3"],
        "raypose data synth: error: unrecognized arguments: --frames",
        {},
    ),
    ("data-no-subcommand", ["data"], "SUBCOMMAND", {}),
    ("data-unknown-subcommand", ["data", "convert"], "convert", {}),
    # data h36m
    ("h36m-root-missing", ["data", "h36m", "--root", "{missing}", "--out", "{new}"], "--root", {}),
    ("h36m-root-is-file", ["data", "h36m", "--root", "{file}", "--out", "{new}"], "--root", {}),
    ("h36m-no-root", ["data", "h36m", "--out", "{new}"], "--root", {}),
    (
        "h36m-existing-dataset",
        ["data", "h36m", "--root", "{h36m_root}", "--out", "{data}"],
        "--force",
        {},
    ),
    (
        "h36m-margin-nan",
        ["data", "h36m", "--root", "{h36m_root}", "--margin", "nan"],
        "--margin",
        {},
    ),
    (
        "h36m-margin-large",
        ["data", "h36m", "--root", "{h36m_root}", "--margin", "3"],
        "--margin",
        {},
    ),
    ("h36m-out-is-file", ["data", "h36m", "--root", "{h36m_root}", "--out", "{file}"], "--out", {}),
    # data samples
    (
        "samples-data-missing",
        ["data", "samples", "--data", "{missing}", "--out", "{new}.png"],
        "--data",
        {},
    ),
    (
        "samples-data-is-folder",
        ["data", "samples", "--data", "{data}", "--out", "{new}.png"],
        "--data",
        {},
    ),
    (
        "samples-truncated-h5",
        ["data", "samples", "--data", "{truncated_h5}", "--out", "{new}.png"],
        "{truncated_h5}",
        {},
    ),
    (
        "samples-not-hdf5",
        ["data", "samples", "--data", "{file}", "--out", "{new}.png"],
        "{file}",
        {},
    ),
    (
        "samples-foreign-h5",
        ["data", "samples", "--data", "{foreign_h5}", "--out", "{new}.png"],
        "schema_version",
        {},
    ),
    (
        "samples-existing-png",
        ["data", "samples", "--data", "{data}/train.h5", "--out", "{png}"],
        "--force",
        {},
    ),
    (
        "samples-out-is-folder",
        ["data", "samples", "--data", "{data}/train.h5", "--out", "{empty_dir}"],
        "--out",
        {},
    ),
    (
        "samples-out-not-png",
        ["data", "samples", "--data", "{data}/train.h5", "--out", "{new}.jpg"],
        "--out",
        {},
    ),
    (
        "samples-n-zero",
        ["data", "samples", "--data", "{data}/train.h5", "--out", "{new}.png", "--n", "0"],
        "--n",
        {},
    ),
    (
        "samples-scale-huge",
        ["data", "samples", "--data", "{data}/train.h5", "--out", "{new}.png", "--scale", "1000"],
        "--scale",
        {},
    ),
    # model-summary
    ("summary-zero-width", ["model-summary", "--set", "fc1_width=0"], "fc1_width", {}),
    ("summary-nan-alpha", ["model-summary", "--set", "lrn_alpha=nan"], "lrn_alpha", {}),
    ("summary-even-window", ["model-summary", "--set", "lrn_window=4"], "lrn_window", {}),
    ("summary-dropout-one", ["model-summary", "--set", "dropout=1.5"], "dropout", {}),
    ("summary-float-width", ["model-summary", "--set", "fc2_width=1.5"], "fc2_width", {}),
    ("summary-unknown-key", ["model-summary", "--set", "width=3"], "width", {}),
    ("summary-no-equals", ["model-summary", "--set", "fc1_width"], "fc1_width", {}),
    ("summary-not-model-key", ["model-summary", "--set", "lr=0.1"], "lr", {}),
    # train
    ("train-name-escapes", [*TRAIN[:5], "--name", "../../escape"], "--name", {}),
    ("train-name-non-ascii", [*TRAIN[:5], "--name", "r\u00e9sum\u00e9"], "--name", {}),
    ("train-name-slash", [*TRAIN[:5], "--name", "a/b"], "--name", {}),
    ("train-name-empty", [*TRAIN[:5], "--name", ""], "--name", {}),
    ("train-name-dots", [*TRAIN[:5], "--name", "a..b"], "--name", {}),
    ("train-lr-inf", [*TRAIN, "--set", "lr=inf"], "--set lr=inf", {}),
    ("train-lr-negative", [*TRAIN, "--set", "optim.lr=-1"], "optim.lr", {}),
    ("train-zero-width", [*TRAIN, "--set", "fc1_width=0"], "fc1_width", {}),
    ("train-momentum-one", [*TRAIN, "--set", "momentum=1"], "momentum", {}),
    ("train-colour-noise-negative", [*TRAIN, "--set", "color_noise=-0.1"], "color_noise", {}),
    ("train-seed-negative", [*TRAIN, "--set", "seed=-1"], "seed", {}),
    ("train-blank-val-subject", [*TRAIN, "--set", "val_subjects=[' ']"], "val_subjects", {}),
    # no validation split: a sampled sweep has nothing to rank trials on
    (
        "tune-no-validation",
        [*TUNE, "--set", "data.val_subjects=[]"],
        "nothing is held out to rank on",
        {},
    ),
    ("train-epoch-samples-negative", [*TRAIN, "--set", "epoch_samples=-1"], "epoch_samples", {}),
    # more per epoch than the training split holds: named with the file, before Ray starts
    (
        "train-epoch-samples-over-split",
        [*TRAIN, "--set", "epoch_samples=100000"],
        "data.epoch_samples: 100000 is more than the",
        {},
    ),
    # a batch per worker larger than the training split: an epoch without a step
    (
        "train-batch-over-split",
        [*TRAIN, "--set", "batch_size=81"],
        (
            "data.batch_size: 81 per worker with 1 worker(s) needs 81 samples per epoch, "
            "but an epoch has 80"
        ),
        {},
    ),
    ("train-weight-decay-nan", [*TRAIN, "--set", "weight_decay=nan"], "weight_decay", {}),
    ("train-epochs-zero", [*TRAIN[:7], "--epochs", "0"], "--epochs", {}),
    ("train-workers-zero", [*TRAIN, "--workers", "0"], "--workers", {}),
    ("train-pretrain-one-epoch", [*TRAIN, "--schedule", "pretrain"], "--epochs", {}),
    ("train-schedule-unknown", [*TRAIN, "--schedule", "cosine"], "--schedule", {}),
    ("train-stop-after-negative", [*TRAIN, "--stop-after-epoch", "-1"], "--stop-after-epoch", {}),
    ("train-config-not-utf8", [*TRAIN, "--config", "{nonutf8}"], "{nonutf8}: line 2", {}),
    ("train-config-bad-yaml", [*TRAIN, "--config", "{badyaml}"], "{badyaml}: line 3", {}),
    ("train-config-is-folder", [*TRAIN, "--config", "{empty_dir}"], "{empty_dir}", {}),
    ("train-config-missing", [*TRAIN, "--config", "{missing}.yaml"], "{missing}.yaml", {}),
    ("train-config-unknown-key", [*TRAIN, "--config", "{unknown_key}"], "learning_rate", {}),
    ("train-config-inf", [*TRAIN, "--config", "{inf_lr}"], "{inf_lr}", {}),
    ("train-config-alias-bomb", [*TRAIN, "--config", "{bomb}"], "{bomb}: refused: it expands", {}),
    (
        "train-set-alias-bomb",
        [
            *TRAIN,
            "--set",
            "nokey=[&a [x,x,x,x,x,x,x,x,x], "
            + ", ".join(f"&{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi"))
            + "]",
        ],
        "--set nokey: refused: it expands",
        {},
    ),
    ("train-set-bad-date", [*TRAIN, "--set", "seed=2024-13-45"], "--set seed", {}),
    (
        "train-data-is-file",
        ["train", "--data", "{file}", "--storage", "{storage}", "--name", "r"],
        "--data",
        {},
    ),
    (
        "train-data-missing",
        ["train", "--data", "{missing}", "--storage", "{storage}", "--name", "r"],
        "--data",
        {},
    ),
    (
        "train-data-empty-folder",
        ["train", "--data", "{empty_dir}", "--storage", "{storage}", "--name", "r"],
        "train.h5",
        {},
    ),
    (
        "train-data-truncated",
        ["train", "--data", "{truncated}", "--storage", "{storage}", "--name", "r"],
        "train.h5",
        {},
    ),
    (
        "train-storage-is-file",
        ["train", "--data", "{data}", "--storage", "{file}", "--name", "r"],
        "--storage",
        {},
    ),
    (
        "train-storage-scheme",
        ["train", "--data", "{data}", "--storage", "ftp://host/x", "--name", "r"],
        "--storage",
        {},
    ),
    # --address where nothing listens: were the storage accepted, that check fails, not Ray
    (
        "train-storage-dotdot",
        [
            *TRAIN[:3],
            "--storage",
            "file://{storage}/../elsewhere",
            "--name",
            "r",
            "--address",
            "{closed}",
        ],
        "--storage: storage URI",
        {},
    ),
    (
        "train-storage-file-host",
        [*TRAIN[:3], "--storage", "file://runs", "--name", "r", "--address", "{closed}"],
        "file:///ABSOLUTE/PATH",
        {},
    ),
    (
        "tune-storage-is-file",
        ["tune", "--space", "{space}", "--data", "{data}", "--storage", "{file}", "--name", "s1"],
        "--storage",
        {},
    ),
    ("train-address-http", [*TRAIN, "--address", "http://127.0.0.1:8265"], "--address", {}),
    ("train-address-nothing-listens", [*TRAIN, "--address", "{closed}"], "--address", {}),
    (
        "train-address-never-answers",
        [*TRAIN, "--address", "{silent}"],
        "did not answer within 1 s",
        {},
    ),
    ("train-address-garbage", [*TRAIN, "--address", "localhost"], "--address", {}),
    ("train-ray-address-http", TRAIN, "RAY_ADDRESS", {"RAY_ADDRESS": "http://127.0.0.1:8265"}),
    (
        "train-ray-timeout-env",
        [*TRAIN, "--address", "{closed}"],
        "RAYPOSE_RAY_CONNECT_TIMEOUT",
        {"RAYPOSE_RAY_CONNECT_TIMEOUT": "soon"},
    ),
    (
        "train-s3-never-answers",
        ["train", "--data", "{data}", "--storage", "s3://bucket/runs", "--name", "r"],
        "did not answer within 1 s",
        S3_SILENT,
    ),
    (
        "train-s3-nothing-listens",
        ["train", "--data", "{data}", "--storage", "s3://bucket/runs", "--name", "r"],
        "unreachable",
        S3_CLOSED,
    ),
    (
        "train-s3-port-out-of-range",
        ["train", "--data", "{data}", "--storage", "s3://bucket/runs", "--name", "r"],
        "AWS_ENDPOINT_URL: port 99999",
        S3_PORT_99999,
    ),
    (
        "train-s3-timeout-env",
        ["train", "--data", "{data}", "--storage", "s3://bucket/runs", "--name", "r"],
        "RAYPOSE_S3_CHECK_TIMEOUT",
        {**S3_SILENT, "RAYPOSE_S3_CHECK_TIMEOUT": "-1"},
    ),
    (
        "train-s3-outage-env",
        ["train", "--data", "{data}", "--storage", "s3://bucket/runs", "--name", "r"],
        "RAYPOSE_UPLOAD_RETRY_S",
        {**S3_SILENT, "RAYPOSE_UPLOAD_RETRY_S": "five minutes"},
    ),
    ("train-epochs-not-int", [*TRAIN[:7], "--epochs", "two"], "--epochs", {}),
    # tune
    ("tune-metric-not-reported", [*TUNE[:2], "{bad_metric}", *TUNE[3:]], "metric", {}),
    ("tune-space-not-utf8", [*TUNE[:2], "{space_nonutf8}", *TUNE[3:]], "{space_nonutf8}: line", {}),
    ("tune-space-missing", [*TUNE[:2], "{missing}.yaml", *TUNE[3:]], "{missing}.yaml", {}),
    ("tune-space-is-config", [*TUNE[:2], "{unknown_key}", *TUNE[3:]], "{unknown_key}", {}),
    ("tune-space-alias-bomb", [*TUNE[:2], "{bomb}", *TUNE[3:]], "{bomb}: refused: it expands", {}),
    ("tune-name-escapes", [*TUNE[:-1], "../x"], "--name", {}),
    ("tune-samples-zero", [*TUNE, "--samples", "0"], "--samples", {}),
    ("tune-max-concurrent-zero", [*TUNE, "--max-concurrent", "0"], "--max-concurrent", {}),
    ("tune-epochs-zero", [*TUNE, "--epochs", "0"], "--epochs", {}),
    ("tune-workers-zero", [*TUNE, "--workers-per-trial", "0"], "--workers-per-trial", {}),
    ("tune-lr-nan", [*TUNE, "--set", "lr=nan"], "--set lr=nan", {}),
    ("tune-no-space", ["tune", *TUNE[3:]], "--space", {}),
    ("tune-gpus-two", [*TUNE, "--gpus-per-worker", "2"], "--gpus-per-worker", {}),
    ("tune-address-http", [*TUNE, "--address", "https://head:8265"], "--address", {}),
    ("tune-resume-unknown", [*TUNE, "--resume"], "--resume", {}),
    # nothing is made for a resume that is refused: the storage folder stays missing
    (
        "tune-resume-missing-storage",
        [
            "tune",
            "--space",
            "{space}",
            "--data",
            "{data}",
            "--storage",
            "{missing}/sweeps",
            "--name",
            "s1",
            "--resume",
        ],
        "--resume",
        {},
    ),
    ("tune-foreign-study-db", [*TUNE, "--study-db", "sqlite:///{foreign_db}"], "--study-db", {}),
    (
        "tune-data-is-file",
        [
            "tune",
            "--space",
            "{space}",
            "--data",
            "{file}",
            "--storage",
            "{storage}",
            "--name",
            "s1",
        ],
        "--data",
        {},
    ),
    # evaluate
    ("evaluate-missing", ["evaluate", "{missing}"], "{missing}", {}),
    ("evaluate-out-is-file", ["evaluate", "{exp}", "--out", "{file}"], "--out", {}),
    ("evaluate-out-holds-report", ["evaluate", "{exp}", "--out", "{report_dir}"], "--force", {}),
    ("evaluate-data-is-file", ["evaluate", "{exp}", "--data", "{file}"], "--data", {}),
    ("evaluate-batch-zero", ["evaluate", "{exp}", "--batch-size", "0"], "--batch-size", {}),
    ("evaluate-best-not-json", ["evaluate", "{exp}", "--out", "{new}"], "best.json", {}),
    # the message names best.json by its resolved path: the workspace's may differ (symlinks)
    (
        "evaluate-best-outside",
        ["evaluate", "{exp_outside}", "--out", "{new}"],
        "is not inside the experiment",
        {},
    ),
    (
        "evaluate-best-dotdot",
        ["evaluate", "{exp_dotdot}", "--out", "{new}"],
        "/best.json: checkpoint '../dataset' is not inside the experiment",
        {},
    ),
    ("evaluate-file-host", ["evaluate", "file://experiment"], "file:///ABSOLUTE/PATH", {}),
    ("evaluate-no-uri", ["evaluate"], "uri", {}),
    (
        "evaluate-s3-never-answers",
        ["evaluate", "s3://bucket/sweep"],
        "did not answer within 1 s",
        S3_SILENT,
    ),
    ("evaluate-s3-nothing-listens", ["evaluate", "s3://bucket/sweep"], "unreachable", S3_CLOSED),
    (
        "evaluate-s3-port-out-of-range",
        ["evaluate", "s3://bucket/sweep"],
        "environment variable AWS_ENDPOINT_URL: port 99999 is not a TCP port",
        S3_PORT_99999,
    ),
    (
        "evaluate-s3-endpoint-s3-port-out-of-range",
        ["evaluate", "s3://bucket/sweep"],
        "environment variable AWS_ENDPOINT_URL_S3: port 70000 is not a TCP port",
        {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:70000"},
    ),
    (
        "evaluate-s3-endpoint-no-scheme",
        ["evaluate", "s3://bucket/sweep"],
        "environment variable AWS_ENDPOINT_URL: not an S3 endpoint URL",
        {"AWS_ENDPOINT_URL": "localhost:9000"},
    ),
    # report
    ("report-missing", ["report", "{missing}", "--out", "{new}"], "{missing}", {}),
    ("report-best-not-json", ["report", "{exp}", "--out", "{new}"], "best.json", {}),
    ("report-out-is-file", ["report", "{exp}", "--out", "{file}"], "--out", {}),
    ("report-out-holds-report", ["report", "{exp}", "--out", "{sweep_report_dir}"], "--force", {}),
    (
        "report-s3-never-answers",
        ["report", "s3://bucket/sweep"],
        "did not answer within 1 s",
        S3_SILENT,
    ),
    ("report-s3-nothing-listens", ["report", "s3://bucket/sweep"], "unreachable", S3_CLOSED),
    (
        "report-s3-port-out-of-range",
        ["report", "s3://bucket/sweep"],
        "AWS_ENDPOINT_URL: port 99999",
        S3_PORT_99999,
    ),
    # bench train
    (
        "bench-repeats-zero",
        ["bench", "train", "--data", "{data}", "--repeats", "0"],
        "--repeats",
        {},
    ),
    ("bench-data-is-file", ["bench", "train", "--data", "{file}"], "--data", {}),
    ("bench-data-half-dataset", ["bench", "train", "--data", "{test_only}"], "--data", {}),
    ("bench-device-tpu", ["bench", "train", "--data", "{data}", "--device", "tpu"], "--device", {}),
    (  # no GPU visible (the CPU build of torch sees none either)
        "bench-device-cuda-without-one",
        ["bench", "train", "--data", "{data}", "--device", "cuda"],
        "--device cuda",
        {"CUDA_VISIBLE_DEVICES": ""},
    ),
    (
        "bench-batch-zero",
        ["bench", "train", "--data", "{data}", "--batch-size", "0"],
        "--batch-size",
        {},
    ),
    ("bench-lr-inf", ["bench", "train", "--data", "{data}", "--set", "lr=inf"], "--set lr=inf", {}),
    (
        "bench-ray-address-http",
        ["bench", "train", "--data", "{data}"],
        "RAY_ADDRESS",
        {"RAY_ADDRESS": "http://127.0.0.1:8265"},
    ),
    # demo: every flag before any data is rendered
    ("demo-samples-zero", ["demo", "--root", "{new}", "--samples", "0"], "--samples", {}),
    ("demo-epochs-zero", ["demo", "--root", "{new}", "--epochs", "0"], "--epochs", {}),
    (
        "demo-epoch-samples-negative",
        ["demo", "--root", "{new}", "--epoch-samples", "-1"],
        "--epoch-samples",
        {},
    ),
    (
        "demo-epoch-samples-over-train",
        ["demo", "--root", "{new}", "--train", "100"],
        "--epoch-samples 1600 is more than --train 100",
        {},
    ),
    # --train too small for the validation subject or an epoch: refused before rendering
    (
        "demo-train-3",
        ["demo", "--root", "{new}", "--train", "3", "--epoch-samples", "0"],
        "--train 3: the synthetic train.h5 would hold no sample of the validation subject S8",
        {},
    ),
    (
        "demo-train-3-epoch-3",
        ["demo", "--root", "{new}", "--train", "3", "--epoch-samples", "3", "--batch-size", "1"],
        "--train 3",
        {},
    ),
    (
        "demo-train-under-a-batch",
        ["demo", "--root", "{new}", "--train", "20", "--epoch-samples", "0", "--workers", "2"],
        "--train 20: the synthetic train.h5 would hold 16 training samples",
        {},
    ),
    (
        "demo-batch-over-epoch-samples",
        ["demo", "--root", "{new}", "--epoch-samples", "8"],
        "--batch-size 16 with --workers 1 needs 16 samples per epoch, more than --epoch-samples 8",
        {},
    ),
    (
        "demo-val-samples-negative",
        ["demo", "--root", "{new}", "--val-samples", "-1"],
        "--val-samples",
        {},
    ),
    ("demo-root-is-file", ["demo", "--root", "{file}"], "--root", {}),
    ("demo-half-dataset", ["demo", "--root", "{half_root}"], "--root", {}),
    ("demo-storage-is-file", ["demo", "--root", "{new}", "--storage", "{file}"], "--storage", {}),
    (
        "demo-metric-not-reported",
        ["demo", "--root", "{new}", "--space", "{bad_metric}"],
        "metric",
        {},
    ),
    (
        "demo-ray-address-http",
        ["demo", "--root", "{new}"],
        "RAY_ADDRESS",
        {"RAY_ADDRESS": "http://127.0.0.1:8265"},
    ),
    # cluster: its flags
    ("cluster-unknown-action", ["cluster", "restart"], "restart", {}),
    ("cluster-port-not-int", ["cluster", "up", "--dashboard-port", "web"], "--dashboard-port", {}),
    (
        "cluster-s3-port-too-large",
        ["cluster", "up", "--state-dir", "{new}", "--s3-port", "70000"],
        "raypose cluster up: error: --s3-port 70000: not a TCP port (1-65535)",
        {},
    ),
    (
        "cluster-dashboard-port-zero",
        ["cluster", "up", "--state-dir", "{new}", "--dashboard-port", "0"],
        "--dashboard-port 0: not a TCP port",
        {},
    ),
    (
        "cluster-ray-port-too-large",
        ["cluster", "up", "--state-dir", "{new}", "--ray-port", "99999"],
        "--ray-port 99999: not a TCP port",
        {},
    ),
    (
        "cluster-bucket-uppercase",
        ["cluster", "up", "--state-dir", "{new}", "--bucket", "MyBucket"],
        "--bucket 'MyBucket'",
        {},
    ),
    # no command at all
    ("no-command", [], "command", {}),
    ("unknown-command", ["fit"], "fit", {}),
]


def _fill(value: str, paths: dict) -> str:
    return value.format(**paths)


@pytest.mark.parametrize("argv, culprit, env", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(argv, culprit, env, workspace, tmp_path, monkeypatch, capsys):
    argv = [_fill(a, workspace) for a in argv]
    culprit = _fill(culprit, workspace)
    ray_tmp = tmp_path / "ray"  # Ray puts a session_* folder here if anything starts it
    ray_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    for key, value in {**SHORT_TIMEOUTS, **env}.items():
        monkeypatch.setenv(key, _fill(value, workspace))
    monkeypatch.chdir(workspace["root"])  # defaults such as data/synth or runs/ would land here
    before = snapshot(workspace["root"])

    start = time.perf_counter()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit from parse_args
        rc = e.code
    seconds = time.perf_counter() - start

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("raypose") and ": error: " in lines[0], err
    assert culprit in lines[0], err
    assert "Traceback" not in err
    assert seconds < IN_PROCESS_BOUND_S, f"{seconds:.1f} s"
    assert not list(ray_tmp.iterdir()), "Ray was started"
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()
    assert snapshot(workspace["root"]) == before, "a file in the workspace was created or changed"


def test_at_least_60_cases_over_every_command():
    commands = {
        tuple(c[1][:2]) if c[1][:1] in (["data"], ["bench"]) else tuple(c[1][:1]) for c in CASES
    }
    assert len(CASES) >= 60
    for command in [
        ("data", "synth"),
        ("data", "h36m"),
        ("data", "samples"),
        ("model-summary",),
        ("train",),
        ("tune",),
        ("evaluate",),
        ("report",),
        ("bench", "train"),
        ("demo",),
        ("cluster",),
    ]:
        assert command in commands, command


# ----------------------------------------------------------------------------------------------
# the same through real processes: the exit code and stderr a shell (or `ray job submit`) sees

SUBPROCESS_CASES = [
    (
        "raypose-cli",
        [sys.executable, "-m", "raypose.cli", "data", "synth", "--out", "{data}"],
        "--force",
        {},
    ),
    (
        "raypose-cli-ray-address",
        [sys.executable, "-m", "raypose.cli", *TRAIN],
        "RAY_ADDRESS",
        {"RAY_ADDRESS": "http://127.0.0.1:8265"},
    ),
    (
        "jobs-train",
        [sys.executable, str(REPO / "jobs" / "train.py"), *TRAIN[1:5], "--name", "../../x"],
        "--name",
        {},
    ),
    (
        "jobs-tune",
        [sys.executable, str(REPO / "jobs" / "tune.py"), *TUNE[1:2], "{bad_metric}", *TUNE[3:]],
        "metric",
        {},
    ),
    (
        "jobs-evaluate",
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "{exp}", "--out", "{file}"],
        "--out",
        {},
    ),
    (
        "jobs-report",
        [sys.executable, str(REPO / "jobs" / "report.py"), "s3://bucket/sweep"],
        "did not answer within 1 s",
        S3_SILENT,
    ),
    (
        "raypose-cli-s3-port-out-of-range",
        [sys.executable, "-m", "raypose.cli", "evaluate", "s3://bucket/sweep"],
        "environment variable AWS_ENDPOINT_URL: port 99999",
        S3_PORT_99999,
    ),
    (
        "raypose-cli-cluster-s3-port",
        [
            sys.executable,
            "-m",
            "raypose.cli",
            "cluster",
            "up",
            "--state-dir",
            "{new}",
            "--s3-port",
            "70000",
        ],
        "--s3-port 70000",
        {},
    ),
    (
        "jobs-train-usage",
        [sys.executable, str(REPO / "jobs" / "train.py"), "--epochs", "x"],
        "--epochs",
        {},
    ),
]


@pytest.mark.parametrize(
    "argv, culprit, env", [c[1:] for c in SUBPROCESS_CASES], ids=[c[0] for c in SUBPROCESS_CASES]
)
def test_bad_input_in_a_real_process(argv, culprit, env, workspace, tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    environ = {
        **os.environ,
        **SHORT_TIMEOUTS,
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    environ.pop("RAYPOSE_DEBUG", None)
    environ.update({k: _fill(v, workspace) for k, v in env.items()})
    before = snapshot(workspace["root"])
    start = time.perf_counter()
    proc = subprocess.run(
        [_fill(a, workspace) for a in argv],
        capture_output=True,
        text=True,
        env=environ,
        cwd=workspace["root"],
        timeout=120,
    )
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and culprit.format(**workspace) in lines[0], proc.stderr
    assert proc.stdout == ""
    assert seconds < SUBPROCESS_BOUND_S, f"{seconds:.1f} s"
    assert not list(ray_tmp.iterdir()), "Ray was started"
    assert snapshot(workspace["root"]) == before


def test_debug_shows_the_traceback(workspace, tmp_path):
    """RAYPOSE_DEBUG=1 adds the traceback; the last line is still the one-line error."""
    environ = {
        **os.environ,
        "RAYPOSE_DEBUG": "1",
        "RAY_TMPDIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "raypose.cli", "model-summary", "--set", "fc1_width=0"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("raypose model-summary: error: --set fc1_width=0")
    )


# ----------------------------------------------------------------------------------------------
# --force replaces, atomically; the checks' own rules


def test_force_replaces_samples_png(workspace, tmp_path):
    out = tmp_path / "grid.png"
    out.write_bytes(b"old")
    args = [
        "data",
        "samples",
        "--data",
        f"{workspace['data']}/train.h5",
        "--out",
        str(out),
        "--n",
        "4",
    ]
    assert cli.main(args) == 2 and out.read_bytes() == b"old"  # refused without --force
    assert cli.main([*args, "--force"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_force_replaces_a_dataset(tmp_path):
    out = tmp_path / "d"
    base = ["data", "synth", "--out", str(out), "--train", "6", "--test", "3", "--no-progress"]
    assert cli.main([*base, "--seed", "1"]) == 0
    first = (out / "train.h5").read_bytes()
    assert cli.main([*base, "--seed", "2"]) == 2 and (out / "train.h5").read_bytes() == first
    assert cli.main([*base, "--seed", "2", "--force"]) == 0
    assert (out / "train.h5").read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.h5", "train.h5"]


def test_names():
    for good in ("a", "run-1", "sweep_2.b", "A" * 100):
        assert check_name(good, "--name") == good and NAME_PATTERN.fullmatch(good)
    for bad in (
        "",
        ".hidden",
        "-x",
        "a..b",
        "..",
        "a/b",
        "a\\b",
        "A" * 101,
        "caf\u00e9",
        "a b",
        "a\n",
    ):
        with pytest.raises(InputError, match="--name"):
            check_name(bad, "--name")


def test_long_rejected_values_are_quoted_only_in_part(monkeypatch):
    """A name or an environment value of 100,000 characters: the message quotes its first 80."""
    from raypose.validate import env_count, env_seconds

    huge = "n" * 100_000
    with pytest.raises(InputError) as err:
        check_name(huge, "--name")
    assert str(err.value).startswith("--name 'nnn") and "... (100002 characters)" in str(err.value)
    assert len(str(err.value)) < 400
    monkeypatch.setenv("RAYPOSE_TEST_SECONDS", huge)
    for read in (env_seconds, env_count):
        with pytest.raises(InputError) as err:
            read("RAYPOSE_TEST_SECONDS", 1)
        assert "RAYPOSE_TEST_SECONDS='nnn" in str(err.value) and len(str(err.value)) < 400


def test_ray_address_accepts_a_grpc_server_and_refuses_a_silent_one(monkeypatch):
    """The address check speaks HTTP/2 to the port: a real gRPC server (what the GCS and the Ray
    Client server are) passes; a port that accepts and never answers fails after the timeout."""
    import concurrent.futures

    import grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    silent = SilentServer()
    monkeypatch.setenv("RAYPOSE_RAY_CONNECT_TIMEOUT", "1")
    try:
        assert ray_address(f"127.0.0.1:{port}", "--address") == f"127.0.0.1:{port}"
        assert ray_address(f"ray://127.0.0.1:{port}", "--address") == f"ray://127.0.0.1:{port}"
        start = time.perf_counter()
        with pytest.raises(InputError, match="did not answer within 1 s"):
            ray_address(f"127.0.0.1:{silent.port}", "--address")
        # the socket timeout is 1 s; 5 s leaves room for a loaded machine
        assert time.perf_counter() - start < 5
    finally:
        server.stop(0)
        silent.close()


def test_ray_address_accepts_a_real_ray_head(ray_local):
    """The GCS of a real local Ray instance passes the check."""
    gcs = ray_local.get_runtime_context().gcs_address
    assert ray_address(gcs, "--address") == gcs


@pytest.mark.parametrize("value", ["inf", "nan", "1e309"])
def test_config_refuses_non_finite_floats(value):
    from raypose.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"--set lrn_beta=.*finite"):
        load_config(None, [f"lrn_beta={value}"])
    assert math.isfinite(load_config(None, ["lrn_beta=0.5"]).model.lrn_beta)


def test_staged_folder_replaces_a_report_and_keeps_other_files(tmp_path):
    """What `evaluate --force` and `report --force` write through: the new report's files replace
    the old ones, an old figure the new report does not draw goes, unrelated files stay, and a
    failure leaves the folder exactly as it was, with no temporary folder behind."""
    from raypose.validate import staged_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    (out / "sweep_history.png").write_text("old figure")
    (out / "notes.txt").write_text("mine")
    owned = ("report.json", "report.md", "sweep_history.png")
    before = snapshot(str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        with staged_folder(out, owned) as stage:
            (stage / "report.json").write_text("half")
            raise RuntimeError("boom")
    assert snapshot(str(tmp_path)) == before
    with staged_folder(out, owned) as stage:
        (stage / "report.json").write_text("new")
        (stage / "report.md").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "report.json": "new",
        "report.md": "new",
        "notes.txt": "mine",
    }


def test_s3_endpoint_urls():
    """AWS_ENDPOINT_URL(_S3): what an S3 client takes passes unchanged; a port outside 1..65535,
    no http(s)://, or no host is refused in one line naming the variable, and a password in the
    URL is never quoted."""
    from raypose.validate import endpoint_url

    for url in (
        "http://127.0.0.1:9000",
        "https://s3.us-east-1.amazonaws.com",
        "http://[::1]:9000",
        "https://minio.example:443/prefix",
        "HTTP://localhost:1",
        "http://host:65535",
    ):
        assert endpoint_url(url, "environment variable AWS_ENDPOINT_URL") == url
    refused = {
        "http://127.0.0.1:99999": "port 99999 is not a TCP port (1 to 65535)",
        "http://127.0.0.1:0": "port 0 is not a TCP port",
        "http://[::1]:70000": "port 70000 is not a TCP port",
        "http://user:secret@host:port": "port 'port' is not a TCP port",
        "127.0.0.1:9000": "not an S3 endpoint URL (no http:// or https://)",
        "ftp://host:21": "not an S3 endpoint URL (the scheme 'ftp')",
        "http://": "the URL names no host",
        "http://user:secret@:9000": "the URL names no host",
        "http://[::1:9000": "not a URL",
        "http://h:" + "9" * 500: f"port {'9' * 80}... (500 characters) is not a TCP port",
    }
    for url, says in refused.items():
        with pytest.raises(InputError) as err:
            endpoint_url(url, "environment variable AWS_ENDPOINT_URL_S3")
        message = str(err.value)
        assert message.startswith(f"environment variable AWS_ENDPOINT_URL_S3: {says}"), (
            url,
            message,
        )
        assert "secret" not in message and "\n" not in message


def test_s3_endpoint_variable_is_checked_where_storage_reads_it(monkeypatch, s3_bucket):
    """storage.endpoint_url() is what every S3 filesystem uses: AWS_ENDPOINT_URL_S3 wins over
    AWS_ENDPOINT_URL, the one in use is checked, and a good one reaches the (moto) server."""
    from raypose import storage

    endpoint, bucket = s3_bucket
    loc = storage.parse(f"s3://{bucket}/x")
    storage.check_reachable(loc, create=False)  # the conftest server, by AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:99999")
    with pytest.raises(InputError, match=r"^environment variable AWS_ENDPOINT_URL_S3: port 99999"):
        storage.check_reachable(loc, create=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:99999")  # not the one in use
    storage.check_reachable(loc, create=False)
    assert storage.endpoint_url() == endpoint
