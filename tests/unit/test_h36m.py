"""The Human3.6M converter on a tiny tree in the real layout: real JPEGs, 32-joint annotations,
two subjects in the splits and one outside them."""

import hashlib
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from raypose import cli
from raypose.data.h36m import H36M_17_OF_32, convert
from raypose.data.schema import DataError, validate_file

W, H = 200, 160  # frame size
CAM_A, CAM_B = 54138969, 55011271


def pose_2d_around(centre_shift=(0.0, 0.0)) -> np.ndarray:
    """32 joints: most at (100, 70); selected joints 0 and 1 span the box (60, 20)-(140, 120);
    joints 4 and 5 (not among the 17) far away, so a box built from them would be wrong."""
    p = np.full((32, 2), (100.0, 70.0))
    p[0], p[1] = (60, 20), (140, 120)
    p[4], p[5] = (500, 500), (-300, -300)
    return p + centre_shift


def write_jpeg(path, grey, marker_at):
    image = np.full((H, W, 3), grey, np.uint8)
    x, y = (int(v) for v in marker_at)
    image[y - 4 : y + 5, x - 4 : x + 5] = (255, 0, 0)  # 9 x 9 red square centred on pixel (x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def write_sequence(root, subject, seq_name, rows):
    """rows: list of (camera, frame, 2D shift, grey level)."""
    seq = root / subject / seq_name
    n = len(rows)
    pose_3d = np.zeros((n, 32, 3))
    for i in range(n):
        for j in range(32):
            pose_3d[i, j] = (10 * j + i, -20 * j, 4000 + j)
    pose_2d = np.stack([pose_2d_around(shift) for _, _, shift, _ in rows])
    for (camera, frame, _shift, grey), p in zip(rows, pose_2d):
        write_jpeg(seq / "imageSequence" / str(camera) / f"img_{frame:06d}.jpg", grey, p[8])
    with h5py.File(seq / "annot.h5", "w") as f:  # the keys and integer codes of h36m-fetch
        f["pose/2d"] = pose_2d
        f["pose/3d"] = pose_3d
        f["camera"] = np.array([r[0] for r in rows])
        f["frame"] = np.array([r[1] for r in rows])
        f["subject"] = np.full(n, int(subject[1:]))
        f["action"] = np.full(n, 15)
        f["subaction"] = np.full(n, 1)
    return pose_3d


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "processed"
    poses = {
        "S1": write_sequence(
            root,
            "S1",
            "Walking-1",
            [(CAM_A, 1, (0, 0), 200), (CAM_A, 6, (-50, -30), 200), (CAM_B, 1, (0, 0), 100)],
        ),
        "S9": write_sequence(root, "S9", "Directions-2", [(CAM_A, 11, (0, 0), 150)]),
    }
    write_sequence(root, "S2", "Eating-1", [(CAM_A, 1, (0, 0), 50)])
    return root, poses


def test_convert(tree, tmp_path):
    root, poses = tree
    with pytest.warns(UserWarning, match=r"subject 'S2' is in neither split"):
        result = convert(root, tmp_path / "out", progress=False)
    assert result["n_train"] == 3 and result["n_test"] == 1 and result["skipped_subjects"] == ["S2"]
    train, test = validate_file(result["train"]), validate_file(result["test"])
    assert train["source"] == "h36m" and train["subjects"] == ["S1"] and test["subjects"] == ["S9"]
    assert train["actions"] == ["Walking"] and test["actions"] == ["Directions"]
    assert train["cameras"] == [str(CAM_A), str(CAM_B)]
    with h5py.File(result["train"]) as f:
        j3, j2, images = f["joints_3d"][:], f["joints_2d"][:], f["images"][:]
        assert f["frame"][:].tolist() == [1, 6, 1]
        assert f["camera"].asstr()[:].tolist() == [str(CAM_A), str(CAM_A), str(CAM_B)]
    # joint selection: raypose joint k is Human3.6M joint H36M_17_OF_32[k]
    np.testing.assert_allclose(j3, poses["S1"][:, H36M_17_OF_32])
    np.testing.assert_allclose(j3[0, 16], (10 * 27, -20 * 27, 4027))
    # crop of row 0: box (60, 20)-(140, 120) -> side ceil(1.2 * 100) = 120 centred on (100, 70):
    # x0 = 40, y0 = 10; a point (x, y) goes to ((x - 40), (y - 10)) * 128 / 120
    np.testing.assert_allclose(j2[0, 0], (21.3333, 10.6667), atol=1e-3)
    np.testing.assert_allclose(j2[0, 6], (64, 64), atol=1e-3)  # joint 8 of 32, at (100, 70)
    np.testing.assert_allclose(j2[0, 1], (106.6667, 117.3333), atol=1e-3)
    # the red marker around image pixel (100, 70) lands around crop pixel (64, 64)
    r, g, b = images[0, 64, 64].astype(int)
    assert r > 180 and g < 90 and b < 90
    assert abs(int(images[0, 30, 100, 1]) - 200) < 12  # grey elsewhere
    # row 1: the same pose moved by (-50, -30): box x0 = -10, y0 = -20 leaves the frame, padded black
    np.testing.assert_allclose(j2[1], j2[0], atol=1e-3)
    assert images[1, :20, :].max() < 12 and images[1, :, :9].max() < 12
    assert abs(int(images[1, 60, 30, 1]) - 200) < 12
    # row 2 comes from the other camera's JPEG (grey 100)
    assert abs(int(images[2, 30, 100, 1]) - 100) < 12
    with h5py.File(result["test"]) as f:
        np.testing.assert_allclose(f["joints_3d"][:], poses["S9"][:, H36M_17_OF_32])


def test_cli(tree, tmp_path, capsys):
    root, _ = tree
    with pytest.warns(UserWarning):
        assert (
            cli.main(
                ["data", "h36m", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]
            )
            == 0
        )
    assert "train.h5 (3 samples)" in capsys.readouterr().out
    # the manifest that --data s3://... is checked against: size and sha256 of each written split
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    for name in ("train.h5", "test.h5"):
        data = (tmp_path / "o" / name).read_bytes()
        assert manifest["files"][name] == {
            "size": len(data),
            "schema_version": 1,
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: Human3\.6M root not found"):
        convert(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_no_sequences(tmp_path):
    (tmp_path / "empty" / "S1" / "Walking-1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no sequences found.*annot\.h5"):
        convert(tmp_path / "empty", tmp_path / "out", progress=False)


def test_missing_annotation_key(tree, tmp_path):
    root, _ = tree
    with h5py.File(root / "S9" / "Directions-2" / "annot.h5", "a") as f:
        del f["frame"]
    with (
        pytest.warns(UserWarning, match="S2"),
        pytest.raises(DataError, match=r"S9/Directions-2/annot\.h5: key 'frame' missing"),
    ):
        convert(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train.h5").exists()  # checked before anything was written


def test_missing_jpeg_keeps_previous_files(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        convert(root, out, progress=False)
    before = {name: (out / name).read_bytes() for name in ("train.h5", "test.h5", "manifest.json")}
    (root / "S9" / "Directions-2" / "imageSequence" / str(CAM_A) / "img_000011.jpg").unlink()
    with (
        pytest.warns(UserWarning),
        pytest.raises(DataError, match=r"img_000011\.jpg: frame image missing.*key 'frame' = 11"),
    ):
        convert(root, out, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    # no temporary files; the manifest (size and sha256 of each split) still describes the files
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.h5", "train.h5"]
