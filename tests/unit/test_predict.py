"""`raypose predict`: its joints equal the evaluation's on the same test samples (from the split
file and from image files of the same crops), the preparation is the evaluation's own code, a
checkpoint or an experiment in S3 (a moto server on 127.0.0.1) works, and each kind of bad input
gets one line and exit code 2 with --out untouched. No Ray: checkpoints are written with
raypose.storage.checkpoint.save from a narrow network."""

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from raypose.cli import main as cli_main
from raypose.config import Config
from raypose.data.dataset import (
    IMAGE_MEAN,
    IMAGE_STD,
    PoseDataset,
    augment_batch,
    box_image,
    prepare_test_images,
)
from raypose.data.skeleton import H36M_SKELETON
from raypose.evaluation import evaluate
from raypose.evaluation.predict import predict
from raypose.model.metrics import per_joint_error
from raypose.storage import checkpoint
from raypose.train.loop import build_model, build_optimizer

REPO = Path(__file__).resolve().parents[2]
# predict and evaluate run the same float32 operations on the same inputs; batches of another
# size may round differently in the last bits (a few 1e-5 mm on joints of a few hundred mm)
FLOAT_TOLERANCE_MM = 1e-3


def save_checkpoint(directory: Path, stage: str = "joint", seed: int = 0) -> Path:
    """A checkpoint of a narrow network (fully connected layers 16 wide) as training writes one."""
    cfg = Config()
    cfg.model.fc1_width, cfg.model.fc2_width = 16, 16
    torch.manual_seed(seed)
    model = build_model(cfg, stage)
    state = {
        "epoch": 1,
        "stage": stage,
        "metrics": {},
        "heads": {"regression": stage != "detection", "detection": stage != "regression"},
    }
    optimizer = build_optimizer(cfg, model)
    return checkpoint.save(
        directory, model.state_dict(), optimizer.state_dict(), cfg.to_dict(), state
    )


def sample_boxes(tiny_data, n: int) -> np.ndarray:
    """The first n 128 x 128 boxes of tiny_data's test split."""
    with h5py.File(tiny_data / "test.h5", "r") as f:
        return f["images"][:n]


def write_images(folder: Path, boxes: np.ndarray) -> list:
    """The boxes as lossless PNG files sample-0.png, sample-1.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, box in enumerate(boxes):
        paths.append(folder / f"sample-{i}.png")
        Image.fromarray(box).save(paths[-1])
    return [str(p) for p in paths]


def joints_of(result: dict) -> np.ndarray:
    return np.array([e["joints_3d"] for e in result["predictions"]], dtype=np.float64)


def check_png(path: Path) -> tuple:
    """A real picture (valid PNG, not blank, many colours); returns (width, height)."""
    Image.open(path).verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 15.0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    return pixels.shape[1], pixels.shape[0]


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"raypose {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("predict") / "run" / "epoch_0001")


@pytest.fixture(scope="module")
def evaluated(ckpt, tiny_data, tmp_path_factory) -> dict:
    """raypose evaluate of the checkpoint on tiny_data's test split: its predictions and report."""
    out = tmp_path_factory.mktemp("evaluation") / "out"
    report = evaluate.evaluate(str(ckpt), str(tiny_data), str(out), batch_size=16)
    with np.load(out / "predictions.npz") as z:
        return {"report": report, **{k: z[k] for k in z.files}}


# ----------------------------------------------------------------------------------------------
# The preparation is the evaluation's


def test_the_evaluation_reads_test_samples_through_prepare_test_images(tiny_data):
    dataset = PoseDataset(tiny_data / "test.h5", augment=False)
    raw = dataset.host_batch([0, 3, 7])
    batch = augment_batch(raw, dataset.augmentation)
    prepared = prepare_test_images(raw["images"])
    assert torch.equal(batch["image"], prepared)
    # by hand: the centre 112 crop (pixels 8..119), / 255, minus the mean, over the std
    boxes = raw["images"].numpy().astype(np.float64)
    expected = ((boxes[:, 8:120, 8:120] / 255.0 - IMAGE_MEAN) / IMAGE_STD).transpose(0, 3, 1, 2)
    # float32 rounding of the fused multiply-add against float64: below 1e-5 for |x| < 3
    np.testing.assert_allclose(prepared.numpy(), expected, rtol=0, atol=1e-5)
    assert prepared.shape == (3, 3, 112, 112) and prepared.dtype == torch.float32


def test_a_box_image_pads_the_shorter_side_and_keeps_a_box_as_it_is(tiny_data):
    box = sample_boxes(tiny_data, 1)[0]
    assert np.array_equal(box_image(Image.fromarray(box)), box)  # 128 x 128 in: the same pixels
    # 100 wide, 50 high, all red: the square of side 100 centred on it is black above and below
    # (rows -25..-1 and 50..74 of the image), 1.28 box pixels per image pixel
    wide = box_image(Image.new("RGB", (100, 50), (255, 0, 0)))
    assert wide.shape == (128, 128, 3) and wide.dtype == np.uint8
    assert (wide[:30] == 0).all() and (wide[98:] == 0).all()  # black: rows < 32 and >= 96
    assert (wide[34:94] == [255, 0, 0]).all()  # red: rows 32..95, one row of blending each side
    # a photo whose EXIF orientation says "turn 90 degrees clockwise" is taken upright
    stored = Image.new("RGB", (50, 100), (0, 0, 255))
    stored.paste((0, 255, 0), (0, 0, 50, 10))  # a green band along the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: shown turned 90 degrees clockwise
    photo_file = BytesIO()
    stored.save(photo_file, format="JPEG", exif=exif.tobytes(), quality=100)
    with Image.open(photo_file) as photo:
        from_photo = box_image(photo).astype(int)
    upright = box_image(stored.transpose(Image.Transpose.ROTATE_270)).astype(int)
    # JPEG's rounding moves colours by a few levels; without the turn most pixels would differ
    assert np.abs(from_photo - upright).mean() < 4
    assert np.abs(from_photo - box_image(stored).astype(int)).mean() > 20
    assert from_photo[64, 124, 1] > 200 and from_photo[64, 4, 1] < 50  # the band is on the right


# ----------------------------------------------------------------------------------------------
# Predictions equal the evaluation's


def test_split_file_predictions_equal_the_evaluations(ckpt, tiny_data, evaluated, tmp_path):
    result = predict(
        str(ckpt),
        data_path=str(tiny_data / "test.h5"),
        out_dir=str(tmp_path / "out"),
        batch_size=16,
        figures_max=2,
    )
    joints = joints_of(result)
    assert joints.shape == (40, 17, 3)
    np.testing.assert_allclose(joints, evaluated["pred_3d"], rtol=0, atol=FLOAT_TOLERANCE_MM)
    # the predictions differ from sample to sample far beyond the tolerance (the test can fail)
    assert joints.std(axis=0)[1:].mean() > 1.0
    # per-sample errors against the evaluation's own ground truth, and their mean its MPJPE
    errors = per_joint_error(evaluated["pred_3d"], evaluated["gt_3d"]).mean(axis=1)
    np.testing.assert_allclose(
        [e["mpjpe_mm"] for e in result["predictions"]], errors, rtol=0, atol=FLOAT_TOLERANCE_MM
    )
    assert result["mean_mpjpe_mm"] == pytest.approx(
        evaluated["report"]["overall"]["mpjpe"], abs=1e-3
    )
    dataset = PoseDataset(tiny_data / "test.h5")
    first = result["predictions"][0]
    assert first["row"] == 0 and first["image"] == "test.h5"
    assert first["subject"] == dataset.subjects[dataset.sample_subjects[0]]
    assert first["action"] == dataset.action_names[dataset.sample_actions[0]]
    on_disk = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    # a labelled split read by a checkpoint is in the run's test-split ledger, after the
    # evaluation's own read
    ledger = json.loads((Path(ckpt).parent / "test_reads.json").read_text())
    assert ledger[-1]["command"] == "raypose predict --data"
    assert ledger[-1]["test_samples"] == 40 and ledger[-1]["data"].endswith("test.h5")
    drawn = [e["figure"] for e in result["predictions"] if e["figure"]]
    assert drawn == ["row-000000.png", "row-000001.png"]
    for name in drawn:
        check_png(tmp_path / "out" / name)


def test_image_files_give_the_evaluations_joints(ckpt, tiny_data, evaluated, tmp_path):
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 10))
    out = tmp_path / "out"
    assert cli_main(["predict", str(ckpt), *images, "--out", str(out), "--batch-size", "4"]) == 0
    result = json.loads((out / "predictions.json").read_text())
    assert [e["image"] for e in result["predictions"]] == [f"sample-{i}.png" for i in range(10)]
    assert result["joint_names"] == list(H36M_SKELETON.names)
    assert result["units"] == "mm" and result["mean_mpjpe_mm"] is None
    joints = joints_of(result)
    np.testing.assert_allclose(joints, evaluated["pred_3d"][:10], rtol=0, atol=FLOAT_TOLERANCE_MM)
    assert (joints[:, 0] == 0).all()  # root-relative: the root joint at 0
    assert "mpjpe_mm" not in result["predictions"][0]
    # one PNG per image: the crop and two views of the skeleton side by side
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(p).name for p in images)
    width, height = check_png(out / "sample-0.png")
    assert width > 2.5 * height


def test_images_of_any_size_and_repeated_names(ckpt, tiny_data, tmp_path):
    box = sample_boxes(tiny_data, 1)[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(box).resize((60, 140)).save(tmp_path / "a" / "person.jpg", quality=95)
    Image.fromarray(box).save(tmp_path / "b" / "person.png")
    paths = [str(tmp_path / "a" / "person.jpg"), str(tmp_path / "b" / "person.png")]
    result = predict(str(ckpt), paths, out_dir=str(tmp_path / "out"))
    assert [e["figure"] for e in result["predictions"]] == ["person.png", "person-2.png"]
    assert [e["path"] for e in result["predictions"]] == paths
    assert joints_of(result).shape == (2, 17, 3)


def test_an_images_only_hdf5_file_has_no_errors(ckpt, tiny_data, evaluated, tmp_path):
    with h5py.File(tmp_path / "boxes.h5", "w") as f:
        f["images"] = sample_boxes(tiny_data, 6)
    result = predict(str(ckpt), data_path=str(tmp_path / "boxes.h5"), out_dir=str(tmp_path / "o"))
    np.testing.assert_allclose(
        joints_of(result), evaluated["pred_3d"][:6], rtol=0, atol=FLOAT_TOLERANCE_MM
    )
    assert result["mean_mpjpe_mm"] is None and "mpjpe_mm" not in result["predictions"][0]


def test_an_experiment_and_a_checkpoint_in_s3(ckpt, tiny_data, s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    remote = f"{bucket}/sweeps/exp1/train/t1/epoch_0001"
    for p in ckpt.iterdir():
        fs.put_file(str(p), f"{remote}/{p.name}")
    best = {"trial_id": "t1", "checkpoint": f"s3://{remote}"}
    fs.pipe(f"{bucket}/sweeps/exp1/best.json", json.dumps(best).encode())
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 3))
    local = predict(str(ckpt), images, out_dir=str(tmp_path / "local"))
    for uri, kind in (
        (f"s3://{bucket}/sweeps/exp1", "experiment"),
        (f"s3://{remote}", "checkpoint"),
    ):
        result = predict(uri, images, out_dir=str(tmp_path / kind))
        assert result["source"]["kind"] == kind
        assert result["source"]["checkpoint"] == f"s3://{remote}"
        assert np.array_equal(joints_of(result), joints_of(local))  # the same weights, bit for bit


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def test_a_file_that_is_not_an_image(ckpt, tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("not an image")
    before = snapshot(tmp_path)
    rc = cli_main(["predict", str(ckpt), str(tmp_path / "notes.jpg"), "--out", str(tmp_path / "o")])
    line = one_error_line(capsys, "predict")
    assert rc == 2
    assert f"IMAGE {tmp_path / 'notes.jpg'}: not an image that Pillow can read" in line
    assert snapshot(tmp_path) == before


def test_a_checkpoint_without_a_regression_head(tiny_data, tmp_path, capsys):
    detection = save_checkpoint(tmp_path / "pre" / "epoch_0001", stage="detection")
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 1))
    rc = cli_main(["predict", str(detection), *images, "--out", str(tmp_path / "o")])
    line = one_error_line(capsys, "predict")
    assert rc == 2
    assert f"checkpoint {detection} has no regression head" in line
    assert "detection stage of a pretrain trial" in line
    assert not (tmp_path / "o").exists()


def test_earlier_predictions_are_refused_without_force(ckpt, tiny_data, tmp_path, capsys):
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 3))
    out = tmp_path / "out"
    assert cli_main(["predict", str(ckpt), *images[:2], "--out", str(out)]) == 0
    (out / "mine.txt").write_text("a file of the user's")
    capsys.readouterr()
    before = snapshot(out)
    rc = cli_main(["predict", str(ckpt), images[2], "--out", str(out)])
    line = one_error_line(capsys, "predict")
    assert rc == 2 and "predictions.json already exists" in line and "--force" in line
    assert snapshot(out) == before
    # --force replaces them: the earlier run's figures go, other files stay
    assert cli_main(["predict", str(ckpt), images[2], "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "predictions.json", "sample-2.png"]
    result = json.loads((out / "predictions.json").read_text())
    assert [e["image"] for e in result["predictions"]] == ["sample-2.png"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no input", "no input: give IMAGE files or --data FILE.h5"),
        ("both inputs", "give either IMAGE files or --data FILE.h5 (not both, not neither)"),
        ("missing image", "IMAGE {tmp}/absent.png: no such image file"),
        ("a file as model", "MODEL {tmp}/model.bin: a file; expected an experiment"),
        ("no such model", "{tmp}/nothing does not exist"),
        ("data without images", "--data {tmp}/empty.h5: key 'images': expected (N, 128, 128, 3)"),
        ("data not hdf5", "--data {tmp}/text.h5: not an HDF5 file"),
        ("batch size", "--batch-size must be >= 1, got 0"),
        ("not onnx", "MODEL {tmp}/broken.onnx: not an ONNX model that onnxruntime can load"),
    ],
)
def test_bad_input_gives_one_line(ckpt, tiny_data, tmp_path, capsys, case, expected):
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 1))
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    (tmp_path / "text.h5").write_text("plain text")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf at all")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    model, args = str(ckpt), list(images)
    if case == "no input":
        args = []
    elif case == "both inputs":
        args += ["--data", str(tiny_data / "test.h5")]
    elif case == "missing image":
        args = [str(tmp_path / "absent.png")]
    elif case == "a file as model":
        model = str(tmp_path / "model.bin")
    elif case == "no such model":
        model = str(tmp_path / "nothing")
    elif case == "data without images":
        args = ["--data", str(tmp_path / "empty.h5")]
    elif case == "data not hdf5":
        args = ["--data", str(tmp_path / "text.h5")]
    elif case == "batch size":
        args += ["--batch-size", "0"]
    elif case == "not onnx":
        model = str(tmp_path / "broken.onnx")
    before = snapshot(tmp_path)
    rc = cli_main(["predict", model, *args, "--out", str(tmp_path / "out")])
    line = one_error_line(capsys, "predict")
    assert rc == 2
    assert expected.format(tmp=tmp_path) in line
    assert snapshot(tmp_path) == before


def test_without_onnxruntime_an_onnx_model_names_what_to_install(tiny_data, tmp_path):
    """A Python where onnxruntime cannot be imported (sys.modules refuses it)."""
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 1))
    (tmp_path / "model.onnx").write_bytes(b"any bytes: the import comes first")
    code = (
        "import sys; sys.modules['onnxruntime'] = None; from raypose.cli import main; "
        f"sys.exit(main(['predict', {str(tmp_path / 'model.onnx')!r}, {images[0]!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "needs onnxruntime" in lines[0] and "raypose[test]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_onnx_model_of_other_shapes_is_refused(tiny_data, tmp_path, capsys):
    """An ONNX graph that is not an export of raypose's: (N, 3, 64, 64) in and out."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["N", 3, 64, 64]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "other.onnx")
    images = write_images(tmp_path / "crops", sample_boxes(tiny_data, 1))
    rc = cli_main(["predict", str(tmp_path / "other.onnx"), *images, "--out", str(tmp_path / "o")])
    line = one_error_line(capsys, "predict")
    assert rc == 2
    assert f"MODEL {tmp_path / 'other.onnx'}: takes and returns [['N', 3, 64, 64], '->'" in line
    assert "expected one float32 input ['batch', 3, 112, 112]" in line
    assert not (tmp_path / "o").exists()
