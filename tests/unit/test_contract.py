"""The error contract on checkpoints: a checkpoint in S3 (a moto server on 127.0.0.1) whose
config.json, state.json or manifest.json is malformed gives `raypose evaluate` one line naming the
checkpoint and the file, exit code 2, with storage and --out untouched; and the checkpoint's
config is checked (every Config check, the machine's memory included) before its weights are
loaded. No Ray: the checkpoints are written with raypose.storage.checkpoint.save from a small model."""

import json
import uuid
from pathlib import Path

import pytest
import torch

from raypose import storage
from raypose.cli import main as cli_main
from raypose.config import Config
from raypose.evaluation import evaluate
from raypose.storage import checkpoint
from raypose.storage.checkpoint import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, STATE_FILE
from raypose.train.loop import build_model, build_optimizer

GIB = 1024**3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid checkpoint of a narrow model, as a sweep trial writes it (a slashed run name)."""
    cfg = Config()
    cfg.model.fc1_width, cfg.model.fc2_width = 16, 16
    cfg.storage.name = "sweep/train/trial_0001"
    torch.manual_seed(0)
    model = build_model(cfg, "joint")
    optimizer = build_optimizer(cfg, model)
    state = {
        "epoch": 2,
        "stage": "joint",
        "metrics": {"val_mpjpe": 100.0},
        "heads": {"regression": True, "detection": True},
    }
    d = tmp_path_factory.mktemp("pristine") / "epoch_0002"
    checkpoint.save(d, model.state_dict(), optimizer.state_dict(), cfg.to_dict(), state)
    return d


@pytest.fixture
def s3(s3_bucket):
    """(s3fs filesystem, bucket) on the moto server of conftest's s3_bucket."""
    import s3fs

    endpoint, bucket = s3_bucket
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
    ), bucket


def snapshot(fs, bucket) -> dict:
    fs.invalidate_cache()
    return {
        name: (info["size"], info.get("ETag"))
        for name, info in fs.find(bucket, detail=True).items()
    }


def damaged_checkpoint(fs, bucket, pristine: Path, name: str, change) -> str:
    """A copy of pristine in the bucket with one file replaced: change is the new bytes, or a
    function of the file's parsed JSON returning the new JSON. The manifest is made to match
    the new file (size, sha256, and for a config object its hash), so that only the file's own
    content is at fault. Returns the checkpoint's s3:// URI."""
    files = {p.name: p.read_bytes() for p in pristine.iterdir()}
    new = (
        change
        if isinstance(change, bytes)
        else json.dumps(change(json.loads(files[name]))).encode()
    )
    files[name] = new
    if name != MANIFEST_FILE:
        manifest = json.loads(files[MANIFEST_FILE])
        manifest["files"][name] = {"size": len(new), "sha256": _sha256(new)}
        if name == CONFIG_FILE:
            try:
                manifest["config_sha256"] = checkpoint.config_hash(json.loads(new))
            except ValueError:
                pass
        files[MANIFEST_FILE] = json.dumps(manifest).encode()
    prefix = f"{bucket}/cases/{uuid.uuid4().hex[:8]}/run/epoch_0002"
    for file_name, data in files.items():
        fs.pipe(f"{prefix}/{file_name}", data)
    return f"s3://{prefix}"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _set(path: str, value):
    """A change that sets one dotted key of a JSON object (adding it if absent)."""

    def change(obj):
        node = obj
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
        return obj

    return change


def _drop(key: str):
    return lambda obj: {k: v for k, v in obj.items() if k != key}


CASES = {  # id: (file, change, what the line must say after "checkpoint <uri>: ")
    "manifest not JSON": (MANIFEST_FILE, b"{not json", "manifest.json is not JSON (Expecting"),
    "manifest not UTF-8": (
        MANIFEST_FILE,
        b'{"files": "\xff"}',
        "manifest.json is not JSON (not UTF-8 text)",
    ),
    "manifest is an array": (
        MANIFEST_FILE,
        lambda m: [m],
        "manifest.json holds a JSON array, expected an object",
    ),
    "manifest files is a list": (
        MANIFEST_FILE,
        lambda m: {**m, "files": list(m["files"])},
        "manifest.json is not a raypose manifest ('files' is missing or not an object)",
    ),
    "manifest without config hash": (
        MANIFEST_FILE,
        _drop("config_sha256"),
        "manifest.json is not a raypose manifest ('config_sha256' is missing",
    ),
    "manifest size is text": (
        MANIFEST_FILE,
        lambda m: {**m, "files": {**m["files"], MODEL_FILE: {"size": "big", "sha256": "00"}}},
        "manifest.json is not a raypose manifest (the entry of model.pt needs a 'size'",
    ),
    "config not JSON": (CONFIG_FILE, b'{"model": ', "config.json is not JSON (Expecting"),
    "config is an array": (
        CONFIG_FILE,
        lambda c: [c],
        "config.json holds a JSON array, expected an object",
    ),
    "config width is text": (
        CONFIG_FILE,
        _set("model.fc1_width", "wide"),
        "config.json: key model.fc1_width: model.fc1_width expects int, got 'wide'",
    ),
    "config section is a number": (
        CONFIG_FILE,
        _set("model", 5),
        "config.json: expected a mapping at model.",
    ),
    "config unknown key": (
        CONFIG_FILE,
        _set("model.width", 3),
        "config.json: key model.width: unknown key 'model.width'",
    ),
    "config dropout out of range": (
        CONFIG_FILE,
        _set("model.dropout", 1.5),
        "config.json: key model.dropout: model.dropout must be in [0, 1); got 1.5",
    ),
    "config even LRN window": (
        CONFIG_FILE,
        _set("model.lrn_window", 4),
        "config.json: key model.lrn_window: model.lrn_window must be an odd integer",
    ),
    "state not JSON": (STATE_FILE, b"epoch = 2", "state.json is not JSON (Expecting"),
    "state is a number": (STATE_FILE, b"2", "state.json holds a JSON number, expected an object"),
    "state without epoch": (
        STATE_FILE,
        _drop("epoch"),
        "state.json: 'epoch' must be a whole number >= 0, got None",
    ),
    "state epoch is text": (
        STATE_FILE,
        _set("epoch", "2"),
        "state.json: 'epoch' must be a whole number >= 0, got '2'",
    ),
    "state without stage": (
        STATE_FILE,
        _drop("stage"),
        "state.json: 'stage' must be one of joint, regression, detection",
    ),
    "state heads is a list": (
        STATE_FILE,
        _set("heads", ["regression"]),
        "state.json: 'heads' must be an object",
    ),
    "state head is text": (
        STATE_FILE,
        _set("heads.regression", "yes"),
        "state.json: 'heads' must be an object",
    ),
}


def run_cli(argv, capsys):
    rc = cli_main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoint_file_exit_2_one_line_naming_the_file(
    case, pristine, s3, tmp_path, capsys
):
    fs, bucket = s3
    name, change, says = CASES[case]
    uri = damaged_checkpoint(fs, bucket, pristine, name, change)
    before = snapshot(fs, bucket)
    out = tmp_path / "out"
    rc, lines = run_cli(["evaluate", uri, "--out", str(out)], capsys)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"raypose evaluate: error: checkpoint {uri}: {says}"), lines[0]
    assert (
        str(tmp_path) not in lines[0] and "/tmp" not in lines[0]
    )  # storage named, not a temp copy
    assert snapshot(fs, bucket) == before  # nothing written to storage
    assert not out.exists()  # nor locally


def test_the_pristine_checkpoint_loads(pristine):
    """The control: the checkpoint the cases damage is accepted as it is."""
    model, cfg, loaded = evaluate.load_model(pristine, torch.device("cpu"))
    assert cfg.storage.name == "sweep/train/trial_0001"  # a trial's slashed name is not refused
    assert loaded["state"]["epoch"] == 2 and model.regression is not None
    assert set(loaded) == {"model", "optimizer", "config", "state", "manifest"}


def test_config_is_checked_before_the_weights_are_loaded(
    pristine, s3, tmp_path, capsys, monkeypatch
):
    """model.pt is not a torch file at all: loading it fails. A bad config is reported instead,
    so it was checked before torch.load; with a good config the same model.pt is what fails."""
    fs, bucket = s3
    garbage = b"these bytes are no torch file" * 10

    def with_weights(config_change):
        uri = damaged_checkpoint(fs, bucket, pristine, CONFIG_FILE, config_change)
        fs.pipe(f"{uri[len('s3://') :]}/{MODEL_FILE}", garbage)
        manifest = json.loads(fs.cat(f"{uri[len('s3://') :]}/{MANIFEST_FILE}"))
        manifest["files"][MODEL_FILE] = {"size": len(garbage), "sha256": _sha256(garbage)}
        fs.pipe(f"{uri[len('s3://') :]}/{MANIFEST_FILE}", json.dumps(manifest).encode())
        return uri

    # control: a valid config, so the weights are loaded and fail
    uri = with_weights(lambda c: c)
    rc, lines = run_cli(["evaluate", uri, "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and len(lines) == 1 and f"checkpoint {uri}: cannot load model.pt" in lines[0], (
        lines
    )

    # a config out of range: refused before the weights are read
    uri = with_weights(_set("optim.lr", -1.0))
    rc, lines = run_cli(["evaluate", uri, "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"raypose evaluate: error: checkpoint {uri}: config.json: key optim.lr: "
        "optim.lr must be > 0; got -1.0"
    ), lines[0]

    # widths past this machine's memory (taken as 32 GiB): refused before the weights are read
    monkeypatch.setattr("raypose.config.machine_memory_bytes", lambda: 32 * GIB)
    uri = with_weights(lambda c: _set("model.fc2_width", 2048)(_set("model.fc1_width", 65536)(c)))
    rc, lines = run_cli(["evaluate", uri, "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"raypose evaluate: error: checkpoint {uri}: config.json: key "
        "model.fc1_width: model.fc1_width is too large for this machine's "
        "memory"
    ), lines[0]
    assert "model.pt" not in lines[0]
    assert not any((tmp_path / x).exists() for x in "abc")


def test_checkpoint_load_names_a_malformed_file(pristine, tmp_path):
    """checkpoint.load (a resuming worker's reader) refuses the same files with the same line."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(pristine, d)
    (d / STATE_FILE).write_text("[1, 2]")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {
        "size": (d / STATE_FILE).stat().st_size,
        "sha256": storage.sha256_file(d / STATE_FILE),
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"^checkpoint {d}: state\.json holds a JSON array, expected an object$",
    ):
        checkpoint.load(d)
    (d / MANIFEST_FILE).write_text(
        json.dumps({**manifest, "files": {MODEL_FILE: manifest["files"][MODEL_FILE]}})
    )
    with pytest.raises(
        checkpoint.CheckpointError, match=r"manifest\.json does not list optimizer\.pt"
    ):
        checkpoint.verify(d)
    manifest["files"][MODEL_FILE] = 3
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"the entry of model\.pt needs a 'size'"):
        checkpoint.verify(d)
