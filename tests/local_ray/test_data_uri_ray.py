"""`raypose train`, `raypose evaluate` and a sweep with --data s3://...: real local Ray, a real moto S3 server
over HTTP (through tests/counting_proxy.py, which counts what the server sends), real HDF5 files."""

import json
from pathlib import Path

import pytest

from raypose.cli import main
from raypose.data import cache as datacache
from raypose.search.sweep import run_sweep
from tests.support import tiny_config  # at import time: importing conftest resets AWS variables
from tests.unit.test_datacache import NOTHING_DOWNLOADED, cache, data_uri, proxy, sizes  # noqa: F401

SMOKE = str(Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml")
TINY = [
    "--epochs",
    "1",
    "--workers",
    "2",
    "--set",
    "data.batch_size=8",
    "--set",
    "data.max_train_samples=32",
    "--set",
    "data.max_val_samples=16",
]


# fixtures in this order: the cache folder and the proxy's endpoint are in the environment before
# ray_local starts Ray, so that its workers inherit them
@pytest.mark.slow
def test_train_twice_and_evaluate_with_data_uri(
    cache, data_uri, proxy, ray_local, tiny_data, tmp_path, capsys
):
    runs = tmp_path / "runs"  # local storage: the proxy then carries data traffic only
    assert (
        main(["train", "--data", data_uri, "--storage", str(runs), "--name", "first", *TINY]) == 0
    )
    first = proxy.bytes_down
    train_size = sizes(tiny_data, ["train.h5"])
    # the driver and both workers share this node's cache: train.h5 came over HTTP once, and
    # test.h5 (which training never reads) not at all
    assert train_size <= first < train_size + NOTHING_DOWNLOADED, first
    folder = datacache.cache_dir(data_uri)
    assert sorted(p.name for p in folder.glob("*.h5")) == ["train.h5"]

    assert (
        main(["train", "--data", data_uri, "--storage", str(runs), "--name", "second", *TINY]) == 0
    )
    second = proxy.bytes_down - first
    assert second < NOTHING_DOWNLOADED, second  # a second run starts from the cache
    for name in ("first", "second"):
        state = json.loads((runs / name / "epoch_0001" / "state.json").read_text())
        assert state["epoch"] == 1
        assert (
            json.loads((runs / name / "epoch_0001" / "config.json").read_text())["data"]["path"]
            == data_uri
        )

    # evaluate takes the data URI from the checkpoint's config: it fetches test.h5 now and finds
    # train.h5 (for the mean-pose baseline) in the cache
    before = proxy.bytes_down
    assert (
        main(["evaluate", str(runs / "first" / "epoch_0001"), "--out", str(tmp_path / "eval")]) == 0
    )
    evaluated = proxy.bytes_down - before
    test_size = sizes(tiny_data, ["test.h5"])
    assert test_size <= evaluated < test_size + NOTHING_DOWNLOADED, evaluated
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["test_samples"] == 40  # tiny_data's whole test split
    out = capsys.readouterr().out
    assert "node check: 1 node(s) read --data " + data_uri in out
    print(f"bytes from the server: first run {first}, second run {second}, evaluation {evaluated}")


@pytest.mark.slow
def test_tune_with_data_uri(cache, data_uri, proxy, ray_local, tiny_data, tmp_path):
    cfg = tiny_config(
        data_uri, tmp_path / "sweeps", workers=1, epochs=2, max_train_samples=32, max_val_samples=16
    )
    best = run_sweep(cfg, SMOKE, "s3data", samples=2, max_concurrent=1)
    assert best["value"] > 0 and best["config"]["data"]["path"] == data_uri
    # the sweep's driver fetched train.h5 once; both trials' workers found it in the node cache
    train_size = sizes(tiny_data, ["train.h5"])
    assert train_size <= proxy.bytes_down < train_size + NOTHING_DOWNLOADED, proxy.bytes_down
