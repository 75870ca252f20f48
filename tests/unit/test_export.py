"""`raypose export`: the ONNX and TorchScript files of the regression network give the torch
network's joints on the same images (within 0.1 mm per joint) at any batch size, run in a Python
that cannot import raypose, prepared as the JSON beside them says; `raypose predict FILE.onnx`
runs the ONNX file; a checkpoint in S3 (a moto server on 127.0.0.1) exports; each kind of bad
input gets one line and exit code 2 with nothing written. No Ray."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from raypose.cli import main as cli_main
from raypose.data.dataset import IMAGE_MEAN, IMAGE_STD, prepare_test_images
from raypose.data.skeleton import H36M_SKELETON
from raypose.evaluation.export import export
from raypose.evaluation.predict import predict
from raypose.evaluation.regressor import load_regressor
from tests.unit.test_predict import (
    REPO,
    joints_of,
    one_error_line,
    sample_boxes,
    save_checkpoint,
    snapshot,
    write_images,
)

# the issue's bound for an exported model against the torch network, per joint; the exporters'
# graphs reorder a few float32 sums, which moves joints by about 1e-4 mm
AGREEMENT_MM = 0.1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint and both of its exports: {'ckpt', 'onnx', 'torchscript'} paths."""
    root = tmp_path_factory.mktemp("export")
    ckpt = save_checkpoint(root / "run" / "epoch_0001", seed=1)
    files = {"ckpt": ckpt}
    for fmt, name in (("onnx", "pose.onnx"), ("torchscript", "pose.pt")):
        export(str(ckpt), fmt, str(root / name))
        files[fmt] = root / name
    return files


def torch_joints(ckpt: Path, boxes: np.ndarray) -> np.ndarray:
    regressor, _ = load_regressor(str(ckpt), torch.device("cpu"), "test")
    with torch.no_grad():
        return regressor(prepare_test_images(torch.from_numpy(boxes))).numpy()


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's own notice
        return torch.jit.load(str(path))


def test_onnx_predictions_agree_with_the_torch_network(exported, tiny_data, tmp_path):
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 7))
    by_torch = predict(str(exported["ckpt"]), images, out_dir=str(tmp_path / "t"), batch_size=4)
    by_onnx = predict(str(exported["onnx"]), images, out_dir=str(tmp_path / "o"), batch_size=4)
    assert by_onnx["source"] == {"kind": "onnx", "onnx": str(exported["onnx"].resolve())}
    a, b = joints_of(by_torch), joints_of(by_onnx)
    assert a.shape == b.shape == (7, 17, 3)
    assert np.abs(a - b).max() < AGREEMENT_MM
    assert a.std(axis=0)[1:].mean() > 100 * AGREEMENT_MM  # the joints differ between images
    assert [e["figure"] for e in by_onnx["predictions"]] == [f"sample-{i}.png" for i in range(7)]
    # a test split through the ONNX file: per-sample errors as with the checkpoint
    split = str(tiny_data / "test.h5")
    with_truth = predict(
        str(exported["onnx"]), data_path=split, out_dir=str(tmp_path / "d"), figures_max=0
    )
    reference = predict(
        str(exported["ckpt"]), data_path=split, out_dir=str(tmp_path / "e"), figures_max=0
    )
    assert np.abs(joints_of(with_truth) - joints_of(reference)).max() < AGREEMENT_MM
    assert with_truth["mean_mpjpe_mm"] == pytest.approx(
        reference["mean_mpjpe_mm"], abs=AGREEMENT_MM
    )


@pytest.mark.parametrize("batch", [1, 5])
def test_torchscript_agrees_with_the_torch_network_at_any_batch_size(exported, tiny_data, batch):
    boxes = sample_boxes(tiny_data, batch)  # traced with a batch of 2
    traced = load_torchscript(exported["torchscript"])
    with torch.no_grad():
        joints = traced(prepare_test_images(torch.from_numpy(boxes))).numpy()
    assert joints.shape == (batch, 17, 3)
    assert np.abs(joints - torch_joints(exported["ckpt"], boxes)).max() < AGREEMENT_MM


def test_the_files_run_without_raypose_as_their_json_says(exported, tiny_data, tmp_path):
    """A Python that refuses to import raypose prepares boxes by the JSON alone (numpy), runs
    both files (onnxruntime, torch.jit) on batches of 3 and 1, and gets the torch network's
    root-relative joints."""
    boxes = sample_boxes(tiny_data, 4)
    np.save(tmp_path / "boxes.npy", boxes)
    code = f"""
import json, sys, warnings
sys.modules["raypose"] = None  # an import of raypose fails from here on
import numpy as np, onnxruntime, torch
spec = json.load(open({str(exported["onnx"]) + ".json"!r}))
inp = spec["input"]
boxes = np.load({str(tmp_path / "boxes.npy")!r}).astype(np.float32)
a, n = inp["crop"]["offset"], inp["crop"]["size"]
norm = inp["normalisation"]
x = (boxes[:, a:a + n, a:a + n] / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])
x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=inp["dtype"])
session = onnxruntime.InferenceSession({str(exported["onnx"])!r})
by_onnx = np.concatenate([session.run(None, {{inp["name"]: x[:3]}})[0],
                          session.run(None, {{inp["name"]: x[3:]}})[0]])
warnings.simplefilter("ignore")
traced = torch.jit.load({str(exported["torchscript"])!r})
with torch.no_grad():
    by_script = np.concatenate([traced(torch.from_numpy(x[:3])).numpy(),
                                traced(torch.from_numpy(x[3:])).numpy()])
np.savez({str(tmp_path / "out.npz")!r}, onnx=by_onnx, script=by_script)
assert not any(m == "raypose" or m.startswith("raypose.") for m in sys.modules if sys.modules[m])
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = torch_joints(exported["ckpt"], boxes)
    with np.load(tmp_path / "out.npz") as out:
        for fmt in ("onnx", "script"):
            assert out[fmt].shape == (4, 17, 3)
            assert np.abs(out[fmt] - expected).max() < AGREEMENT_MM, fmt
            assert (np.abs(out[fmt][:, 0]) < 1e-6).all()  # root-relative: the root at 0


def test_the_json_beside_an_export(exported):
    for fmt in ("onnx", "torchscript"):
        spec = json.loads(Path(str(exported[fmt]) + ".json").read_text())
        assert spec["format"] == fmt and spec["file"] == exported[fmt].name
        assert spec["input"]["shape"] == ["batch", 3, 112, 112]
        assert spec["input"]["dtype"] == "float32"
        assert spec["input"]["box_size"] == 128
        assert spec["input"]["crop"] == {"offset": 8, "size": 112}
        assert spec["input"]["normalisation"]["mean"] == [0.485, 0.456, 0.406]
        assert spec["input"]["normalisation"]["std"] == [0.229, 0.224, 0.225]
        # the very numbers the network was trained with, once read as float32
        assert np.array_equal(np.float32(spec["input"]["normalisation"]["mean"]), IMAGE_MEAN)
        assert np.array_equal(np.float32(spec["input"]["normalisation"]["std"]), IMAGE_STD)
        assert spec["output"]["shape"] == ["batch", 17, 3] and spec["output"]["units"] == "mm"
        assert spec["joint_names"] == list(H36M_SKELETON.names)
        assert spec["joint_parents"] == list(H36M_SKELETON.parents)
        assert spec["source"]["checkpoint"] == str(exported["ckpt"])
        assert spec["source"]["epoch"] == 1


def test_a_checkpoint_in_s3_exports(exported, tiny_data, s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    remote = f"{bucket}/runs/r1/epoch_0001"
    for p in exported["ckpt"].iterdir():
        fs.put_file(str(p), f"{remote}/{p.name}")
    out = tmp_path / "from-s3.pt"
    assert cli_main(["export", f"s3://{remote}", "--format", "torchscript", "--out", str(out)]) == 0
    assert json.loads(Path(str(out) + ".json").read_text())["source"]["checkpoint"] == (
        f"s3://{remote}"
    )
    boxes = sample_boxes(tiny_data, 3)
    with torch.no_grad():
        joints = load_torchscript(out)(prepare_test_images(torch.from_numpy(boxes))).numpy()
    assert np.abs(joints - torch_joints(exported["ckpt"], boxes)).max() < AGREEMENT_MM


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown format", "--format 'tflite' is not known; use one of onnx, torchscript"),
        (
            "detection checkpoint",
            "has no regression head (the detection stage of a pretrain trial)",
        ),
        ("existing file", "--out: {tmp}/old.onnx already exists; pass --force to replace it"),
        ("existing json", "--out: {tmp}/new.onnx.json already exists; pass --force"),
        ("wrong suffix", "--out {tmp}/pose.bin: expected a file name ending in .onnx"),
        ("onnx as model", "MODEL {tmp}/old.onnx: already an exported model"),
        ("no such model", "{tmp}/nothing does not exist"),
    ],
)
def test_bad_input_gives_one_line(exported, tmp_path, capsys, case, expected):
    (tmp_path / "old.onnx").write_bytes(b"an earlier export")
    (tmp_path / "new.onnx.json").write_text("{}")
    model, fmt, out = str(exported["ckpt"]), "onnx", str(tmp_path / "pose.onnx")
    if case == "unknown format":
        fmt, out = "tflite", str(tmp_path / "pose.tflite")
    elif case == "detection checkpoint":
        model = str(save_checkpoint(tmp_path / "pre" / "epoch_0001", stage="detection"))
    elif case == "existing file":
        out = str(tmp_path / "old.onnx")
    elif case == "existing json":
        out = str(tmp_path / "new.onnx")
    elif case == "wrong suffix":
        out = str(tmp_path / "pose.bin")
    elif case == "onnx as model":
        model = str(tmp_path / "old.onnx")
    elif case == "no such model":
        model = str(tmp_path / "nothing")
    before = snapshot(tmp_path)
    rc = cli_main(["export", model, "--format", fmt, "--out", out])
    line = one_error_line(capsys, "export")
    assert rc == 2
    assert expected.format(tmp=tmp_path) in line
    assert snapshot(tmp_path) == before


def test_force_replaces_an_earlier_export(exported, tmp_path):
    out = tmp_path / "pose.pt"
    out.write_bytes(b"an earlier export")
    (tmp_path / "pose.pt.json").write_text("{}")
    args = ["export", str(exported["ckpt"]), "--format", "torchscript", "--out", str(out)]
    assert cli_main([*args, "--force"]) == 0
    assert load_torchscript(out) is not None
    assert json.loads((tmp_path / "pose.pt.json").read_text())["format"] == "torchscript"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pose.pt", "pose.pt.json"]


def test_without_onnxscript_the_onnx_format_names_the_extra(exported, tmp_path):
    """A Python where onnxscript cannot be imported (sys.modules refuses it)."""
    code = (
        "import sys; sys.modules['onnxscript'] = None; from raypose.cli import main; "
        f"sys.exit(main(['export', {str(exported['ckpt'])!r}, '--format', 'onnx', "
        f"'--out', {str(tmp_path / 'pose.onnx')!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--format onnx needs the onnxscript package: pip install 'raypose[export]'" in lines[0]
    assert list(tmp_path.iterdir()) == []
