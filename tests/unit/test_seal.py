"""The sweep's trust boundary (raypose.storage.seal): Tune's pickles are read back only when sealed with
this machine's key; a pickle planted in storage never runs. A real resume that refuses a planted
tuner.pkl: tests/local_ray/test_interrupt.py::test_a_sweep_stops_resumes_and_never_loads_a_planted_pickle."""

import pickle
from pathlib import Path

import pytest

from raypose import storage
from raypose.config import ConfigError
from raypose.storage import seal

KEY = "k" * 40


class Planted:
    """A pickle whose loading writes a marker file (what an attacker's os.system would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(seal.KEY_ENV, KEY)
    monkeypatch.setattr(seal, "_KEY", None)
    return KEY.encode()


def _write(fs, path: str, data: bytes):
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


@pytest.fixture(params=["local", "s3"])
def tune_fs(request, tmp_path, key):
    """Tune's filesystem (seal.tune_storage) on a local folder and on moto S3 over HTTP."""
    if request.param == "local":
        loc = storage.parse(str(tmp_path / "exp"))
        Path(loc.path).mkdir()
    else:
        _, bucket = request.getfixturevalue("s3_bucket")
        loc = storage.parse(f"s3://{bucket}/exp")
    root, fs = seal.tune_storage(loc)
    return root, fs, storage.filesystem(loc)


def test_guarded_files_are_sealed_on_write_and_checked_on_read(tune_fs):
    root, fs, plain = tune_fs
    state = f"{root}/experiment_state-2026-12-06_10-00-00.json"
    _write(fs, state, b'{"trial_data": []}')
    _write(fs, f"{root}/result.json", b"{}")
    assert plain.exists(state + seal.SUFFIX)
    assert not plain.exists(f"{root}/result.json" + seal.SUFFIX)  # not a file Ray unpickles
    assert _read(fs, state) == b'{"trial_data": []}'
    assert seal.verify_experiment(plain, root, str) == 1

    plain.pipe_file(state, b'{"trial_data": [1]}')  # changed in storage after the sweep wrote it
    with pytest.raises(seal.SealError, match="does not match its seal"):
        _read(fs, state)
    with pytest.raises(seal.SealError, match="experiment_state-2026-12-06_10-00-00.json"):
        seal.verify_experiment(plain, root, str)


def test_a_planted_pickle_is_refused_and_never_loaded(tune_fs, tmp_path):
    root, fs, plain = tune_fs
    marker = tmp_path / "marker"
    plain.pipe_file(f"{root}/tuner.pkl", pickle.dumps(Planted(marker)))
    with pytest.raises(seal.SealError, match="tuner.pkl: it has no seal"):
        _read(fs, f"{root}/tuner.pkl")
    # a seal copied from another sealed file does not cover it either: the name is sealed too
    _write(fs, f"{root}/error.pkl", b"x")
    plain.pipe_file(
        f"{root}/tuner.pkl" + seal.SUFFIX, plain.cat_file(f"{root}/error.pkl" + seal.SUFFIX)
    )
    with pytest.raises(seal.SealError, match="does not match"):
        _read(fs, f"{root}/tuner.pkl")
    assert not marker.exists()


def test_another_key_is_named_and_refused(tune_fs, monkeypatch):
    root, fs, _ = tune_fs
    _write(fs, f"{root}/tuner.pkl", b"state")
    monkeypatch.setenv(seal.KEY_ENV, "o" * 40)
    monkeypatch.setattr(seal, "_KEY", None)
    with pytest.raises(
        seal.SealError, match=r"sealed with another key \(key id \w{12}; this machine's is \w{12}\)"
    ):
        _read(fs, f"{root}/tuner.pkl")


def test_the_key_file_is_made_once_private_and_a_short_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(seal.KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    key = seal.load_key()
    assert len(key) == 32 and seal.load_key() == key
    assert (seal.key_file().stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv(seal.KEY_ENV, "short")
    with pytest.raises(ConfigError, match=f"{seal.KEY_ENV} must be at least 32 characters"):
        seal.load_key()


def test_the_filesystem_sent_to_other_processes_carries_no_key(tune_fs):
    _, fs, _ = tune_fs
    assert KEY.encode() not in pickle.dumps(fs)


def test_a_file_stopped_between_its_two_writes_still_reads(tune_fs, key):
    """While a guarded file is replaced, its seal covers the old and the new content: a driver
    killed between writing the file and its final seal leaves a sweep that still resumes."""
    root, fs, plain = tune_fs
    state = f"{root}/experiment_state-x.json"
    _write(fs, state, b"old")
    both = plain.cat_file(state + seal.SUFFIX) + seal.seal_text(key, state, b"new").encode()
    plain.pipe_file(state + seal.SUFFIX, both)  # the seal as it is during the replacement
    assert _read(fs, state) == b"old"
    plain.pipe_file(state, b"new")  # the file written, the final seal not yet
    assert _read(fs, state) == b"new"
    _write(fs, state, b"newer")
    assert len(plain.cat_file(state + seal.SUFFIX).splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    [
        "tuner.pkl",
        "error.pkl",
        "experiment_state-2026-12-06_10-00-00.json",
        "search_gen_state-2026-12-06_10-00-00.json",
        "basic-variant-state-2026-12-06_10-00-00.json",  # a grid sweep's: cloudpickle
    ],
)
def test_every_file_tune_unpickles_is_guarded(name):
    assert seal.guarded(f"bucket/exp/{name}")
    assert not seal.guarded(f"bucket/exp/{name}{seal.SUFFIX}")


def test_files_tune_reads_as_plain_data_are_not_guarded():
    for name in ("result.json", "progress.csv", "params.json", "grid.json", "sweep.json"):
        assert not seal.guarded(f"bucket/exp/{name}")
