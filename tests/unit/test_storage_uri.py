"""Storage URIs (raypose.storage.parse) and what an experiment's best.json may point at
(raypose.evaluation.evaluate.resolve): no Ray, no S3 server; local folders under tmp_path only.

- a '..' segment is refused in every form of URI, with one line that quotes the URI;
- file URIs follow RFC 8089: file:///ABS and file://localhost/ABS are local, %-escapes are
  decoded, any other host (file://runs, file://tmp/x) is refused instead of being read as the
  current folder or as /x;
- best.json may only name a checkpoint under its own experiment; anything else is refused
  before a byte is read from the checkpoint or written anywhere.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from raypose import cli, storage, validate
from raypose.storage import Location, StorageError


def snapshot(root) -> dict:
    """{relative path: sha256} of every file under root, and every folder (as None)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[str((Path(dirpath) / name).relative_to(root))] = None
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------------
# '..' segments


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/../x",
        "s3://bucket/a/../b",
        "s3://bucket/a/..",
        "s3://../x",
        "file:///a/../b",
        "file://localhost/a/../b",
        "file:///a/%2E%2E/b",  # decoded before the check: the same '..' as above
    ],
)
def test_a_parent_segment_is_refused_in_a_uri(uri):
    with pytest.raises(StorageError) as err:
        storage.parse(uri)
    message = str(err.value)
    assert repr(uri) in message and "'..' path segment" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a..b/c", Location("s3", "bucket/a..b/c")),  # '..' inside a name is a name
        ("s3://bucket/.../x", Location("s3", "bucket/.../x")),
        ("s3://bucket/prefix/", Location("s3", "bucket/prefix")),
    ],
)
def test_dots_inside_names_are_kept(uri, expected):
    assert storage.parse(uri) == expected


# ----------------------------------------------------------------------------------------------
# plain paths: as before


def test_plain_relative_and_home_paths_resolve_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    here = tmp_path.resolve()
    assert storage.parse("runs") == Location("file", str(here / "runs"))
    assert storage.parse("runs/a..b") == Location("file", str(here / "runs" / "a..b"))
    assert storage.parse("./runs/") == Location("file", str(here / "runs"))
    assert storage.parse("~/runs") == Location("file", str(here / "home" / "runs"))
    # a plain path is not a URI: '%', '?' and '#' are characters of its name
    assert storage.parse("a%20b#c?d") == Location("file", str(here / "a%20b#c?d"))
    assert storage.parse(str(here / "x")) == Location("file", str(here / "x"))


# ----------------------------------------------------------------------------------------------
# file URIs (RFC 8089)


def test_file_uris_name_local_absolute_paths(tmp_path):
    base = tmp_path.resolve()
    assert storage.parse(f"file://{base}/runs") == Location("file", str(base / "runs"))
    assert storage.parse(f"file://localhost{base}/runs") == Location("file", str(base / "runs"))
    assert storage.parse(f"file://LOCALHOST{base}/runs") == Location("file", str(base / "runs"))
    assert storage.parse(f"file:{base}/runs") == Location("file", str(base / "runs"))  # file:/abs
    assert storage.parse("file:///tmp/a%20b") == Location("file", str(Path("/tmp/a b").resolve()))
    assert storage.parse(f"file://{base}/a%23b%3Fc") == Location("file", str(base / "a#b?c"))
    assert storage.parse(f"file://{base}/caf%C3%A9") == Location("file", str(base / "caf\u00e9"))
    # POSIX leaves a leading '//' to the implementation; file:////x is /x
    assert storage.parse(f"file:///{base}/runs") == Location("file", str(base / "runs"))


@pytest.mark.parametrize(
    "uri",
    [
        "file://runs",
        "file://tmp/x",
        "file://runs/sweep",
        "file://localhost:8000/tmp/x",
        "file://user@localhost/tmp/x",
    ],
)
def test_a_file_uri_with_a_host_is_refused(uri):
    with pytest.raises(StorageError) as err:
        storage.parse(uri)
    message = str(err.value)
    assert repr(uri) in message
    assert "file:///ABSOLUTE/PATH" in message and "plain path" in message


@pytest.mark.parametrize(
    "uri, what",
    [
        ("file://", "no absolute path"),
        ("file:runs", "no absolute path"),
        ("file://localhost", "no absolute path"),
        ("file:///tmp/a#b", "%23"),  # urlparse would cut the path at '#' without a word
        ("file:///tmp/a?b", "%3F"),
        ("file:///tmp/a%00b", "NUL"),
        ("s3://bucket/a#b", "'?' or '#'"),
        ("s3://bucket/a?versionId=3", "'?' or '#'"),
    ],
)
def test_other_malformed_uris_are_refused(uri, what):
    with pytest.raises(StorageError) as err:
        storage.parse(uri)
    assert repr(uri) in str(err.value) and what in str(err.value)


def test_a_long_uri_is_quoted_only_in_part():
    uri = "s3://bucket/" + "x/" * 2000 + ".."
    with pytest.raises(StorageError) as err:
        storage.parse(uri)
    message = str(err.value)
    assert len(message) < 1024
    assert repr(uri)[: storage.URI_SHOWN] in message
    assert f"... ({len(repr(uri))} characters)" in message


def test_a_plain_path_is_made_absolute_with_its_parent_segments_resolved(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert storage.parse("../runs") == Location("file", str(tmp_path / "runs"))
    assert storage.parse(f"{tmp_path}/a/../b") == Location("file", str(tmp_path / "b"))


def test_the_storage_flag_names_itself(tmp_path, monkeypatch):
    """--storage goes through storage.storage_location, which puts the flag first."""
    monkeypatch.chdir(tmp_path)  # where file://runs used to land, and was accepted
    for uri in ("file://runs", f"file://{tmp_path}/../x"):
        with pytest.raises(validate.InputError, match=r"^--storage: storage URI "):
            storage.storage_location(uri, "--storage")


@pytest.mark.parametrize(
    "uri, culprit",
    [
        ("file://runs", "file:///ABSOLUTE/PATH"),
        ("file:///{tmp}/exp/../other", "'..' path segment"),
    ],
)
def test_the_command_line_gives_one_line_and_exit_2(uri, culprit, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    (tmp_path / "other").mkdir()
    before = snapshot(tmp_path)
    rc = cli.main(["evaluate", uri.format(tmp=tmp_path), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("raypose evaluate: error: storage URI ") and culprit in lines[0]
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# best.json names a checkpoint inside its experiment only


@pytest.fixture
def experiment(tmp_path):
    """An experiment folder with a checkpoint under it, a sibling experiment whose name starts
    with this one's, and an outside folder that looks like a checkpoint (it has a manifest)."""
    exp = tmp_path / "sweeps" / "s1"
    ckpt = exp / "train" / "t1" / "epoch_0002"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    for folder in (tmp_path / "other", tmp_path / "sweeps" / "s1-copy"):
        (folder / "epoch_0001").mkdir(parents=True)
        (folder / "epoch_0001" / "manifest.json").write_text("{}")
    (exp / "escape").symlink_to(tmp_path / "other", target_is_directory=True)
    return exp


def write_best(exp: Path, checkpoint) -> None:
    (exp / "best.json").write_text(json.dumps({"trial_id": "t1", "checkpoint": checkpoint}))


@pytest.mark.parametrize(
    "checkpoint",
    [
        "/etc",
        "../other/epoch_0001",
        "{tmp}/other/epoch_0001",
        "{tmp}/sweeps/s1-copy/epoch_0001",  # shares the experiment's name as a prefix, not its folder
        "{tmp}/sweeps/s1",  # the experiment itself is no checkpoint under it
        "{tmp}/sweeps/s1/../../other/epoch_0001",
        "{tmp}/sweeps/s1/escape/epoch_0001",  # a link inside that leads outside
        "file://{tmp}/other/epoch_0001",
        "file://sweeps/s1/train/t1/epoch_0002",
        "s3://bucket{tmp}/sweeps/s1/train/t1/epoch_0002",
        42,
        ["{tmp}/sweeps/s1/train/t1/epoch_0002"],
    ],
)
def test_best_json_pointing_outside_its_experiment_is_refused(
    experiment, checkpoint, tmp_path, monkeypatch
):
    from raypose.evaluation import evaluate

    tmp = str(tmp_path)
    if isinstance(checkpoint, str):
        checkpoint = checkpoint.format(tmp=tmp)
    elif isinstance(checkpoint, list):
        checkpoint = [c.format(tmp=tmp) for c in checkpoint]
    write_best(experiment, checkpoint)
    monkeypatch.chdir(experiment)  # a relative path must not be read against the experiment
    before = snapshot(tmp_path)
    with pytest.raises(evaluate.EvaluationError) as err:
        evaluate.resolve(str(experiment))
    message = str(err.value)
    assert message.startswith(
        f"{experiment.resolve() / 'best.json'}: checkpoint "
        f"{validate.shown(checkpoint)} is not inside the experiment "
        f"{experiment.resolve()}"
    ), message
    assert "\n" not in message
    assert snapshot(tmp_path) == before


def test_a_long_checkpoint_value_is_quoted_only_in_part(experiment):
    from raypose.evaluation import evaluate

    checkpoint = "/elsewhere/" + "x" * 100_000
    write_best(experiment, checkpoint)
    with pytest.raises(evaluate.EvaluationError) as err:
        evaluate.resolve(str(experiment))
    assert len(str(err.value)) < 1024
    assert f"... ({len(repr(checkpoint))} characters)" in str(err.value)


def test_the_command_line_refuses_it_in_one_line_and_writes_nothing(experiment, tmp_path, capsys):
    write_best(experiment, str(tmp_path / "other" / "epoch_0001"))
    before = snapshot(tmp_path)
    rc = cli.main(["evaluate", str(experiment), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("raypose evaluate: error: ") and "best.json" in lines[0]
    assert "is not inside the experiment" in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("form", ["path", "file-uri", "localhost-uri", "relative-experiment"])
def test_a_checkpoint_under_the_experiment_is_taken(experiment, tmp_path, monkeypatch, form):
    ckpt = experiment.resolve() / "train" / "t1" / "epoch_0002"
    written = {
        "path": str(ckpt),
        "file-uri": f"file://{ckpt}",
        "localhost-uri": f"file://localhost{ckpt}",
        "relative-experiment": str(ckpt),
    }[form]
    write_best(experiment, written)
    uri = str(experiment)
    if form == "relative-experiment":
        monkeypatch.chdir(tmp_path)
        uri = "sweeps/s1"
    from raypose.evaluation import evaluate

    target = evaluate.resolve(uri)
    assert target["kind"] == "experiment"
    assert target["checkpoint"] == Location("file", str(ckpt))
    assert target["experiment"] == Location("file", str(experiment.resolve()))
