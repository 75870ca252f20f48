"""The Human3.6M converter on a tiny tree in the real layout: real JPEGs, 32-joint annotations,
two subjects in the splits and one outside them."""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from raypose import cli
from raypose.data.h36m import (
    CROP_CENTRED_ON,
    H36M_17_OF_32,
    RECIPE,
    convert,
    ordinal,
    regular_step,
    selection_attrs,
)
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


def write_sequence(root, subject, seq_name, rows, univ=None):
    """rows: list of (camera, frame, 2D shift, grey level); univ: pose/3d-univ (N, 32, 3), the
    poses h36m-fetch selects training frames on (left out when None, as in older trees)."""
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
        if univ is not None:
            f["pose/3d-univ"] = univ
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
    with pytest.raises(DataError, match=r"empty: no sequences found.*annot\.h5.*docs/human36m"):
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


# ----------------------------------------------------------------------------------------------
# Frame selection: h36m-fetch's tree holds every 64th test frame and motion-selected training
# frames; the files and the converter say so, and --test-every chooses among the test frames

REPO = Path(__file__).resolve().parents[2]


def motion_poses(n_views, frames_per_view, step_mm):
    """pose/3d-univ whose joint 0 moves step_mm between consecutive rows of each camera (the
    other joints stay): what h36m-fetch's 40 mm rule leaves when step_mm >= 40."""
    univ = np.zeros((n_views * frames_per_view, 32, 3))
    univ[:, 0, 0] = np.tile(np.arange(frames_per_view) * step_mm, n_views)
    return univ


def fetch_layout(root, train_move_mm=45.0, test_frames=(1, 65, 129, 193), univ=True):
    """A tree in h36m-fetch's exact layout: processed/S*/<Action>-<subaction>/annot.h5 and
    imageSequence/<camera>/img_%06d.jpg. S1's two cameras hold frames 1, 4, 7, 11 (gaps as the
    40 mm rule leaves them); S9 and S11 hold test_frames of each camera."""
    train_rows = [(c, f, (0, 0), 180) for c in (CAM_A, CAM_B) for f in (1, 4, 7, 11)]
    write_sequence(
        root,
        "S1",
        "Walking-1",
        train_rows,
        univ=motion_poses(2, 4, train_move_mm) if univ else None,
    )
    write_sequence(
        root,
        "S9",
        "Directions-2",
        [(c, f, (0, 0), 120) for c in (CAM_A, CAM_B) for f in test_frames],
    )
    write_sequence(root, "S11", "Eating-1", [(CAM_A, f, (0, 0), 60) for f in test_frames[:2]])
    return root


def attrs_of(path) -> dict:
    return selection_attrs(path)


def test_fetch_tree_frame_selection_is_recorded(tmp_path, capsys):
    root = fetch_layout(tmp_path / "processed")
    out = tmp_path / "out"
    assert cli.main(["data", "h36m", "--root", str(root), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    every_64th = "every 64th frame (frame numbers 1, 65, 129, ...)"
    assert f"  test frames: {every_64th}" in printed
    assert "  train frames: frames kept once some joint had moved at least 40 mm" in printed
    assert f"crops centred on {CROP_CENTRED_ON}" in printed
    test, train = attrs_of(out / "test.h5"), attrs_of(out / "train.h5")
    assert test == {
        "frame_selection": every_64th,
        "test_every": 64,
        "crop_centred_on": CROP_CENTRED_ON,
    }
    assert train["test_every"] == 64 and train["crop_centred_on"] == CROP_CENTRED_ON
    assert train["frame_selection"].startswith(
        "frames kept once some joint had moved at least 40 mm since the last kept frame"
    )
    with h5py.File(out / "test.h5") as f:  # every test row the tree holds; S11 sorts before S9
        assert f["frame"][:].tolist() == [1, 65] + [1, 65, 129, 193] * 2
    # the evaluation's report states it in its header
    from raypose.evaluation import evaluate

    line = evaluate.test_frames_line({"test_frames": test})
    assert line == [f"Test frames: {every_64th}; crops centred on {CROP_CENTRED_ON}."]
    assert evaluate.test_frames_line({"test_frames": {}}) == []


def test_test_every_keeps_a_multiple_of_the_trees_step(tmp_path, capsys):
    root = fetch_layout(tmp_path / "processed")
    out = tmp_path / "out"
    argv = ["data", "h36m", "--root", str(root), "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "--test-every", "128"]) == 0
    chosen = (
        "every 128th frame (frame numbers 1, 129, 257, ...), chosen with --test-every 128 from "
        "a tree holding every 64th frame (frame numbers 1, 65, 129, ...)"
    )
    assert f"  test frames: {chosen}" in capsys.readouterr().out
    with h5py.File(out / "test.h5") as f:
        assert f["frame"][:].tolist() == [1, 1, 129, 1, 129]
        assert f["subject"].asstr()[:].tolist() == ["S11"] + ["S9"] * 4
        assert f.attrs["test_every"] == 128 and f.attrs["frame_selection"] == chosen
    with h5py.File(out / "train.h5") as f:  # training rows are not touched by --test-every
        assert f["frame"][:].tolist() == [1, 4, 7, 11] * 2 and f.attrs["test_every"] == 128


def test_test_every_the_tree_cannot_give_is_one_line(tmp_path, capsys):
    root = fetch_layout(tmp_path / "processed")
    out = tmp_path / "out"
    argv = ["data", "h36m", "--root", str(root), "--out", str(out), "--no-progress"]
    assert cli.main([*argv, "--test-every", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raypose data h36m: error: --test-every 5: ")
    assert f"S11/Eating-1 camera {CAM_A} has no frame 6" in err[0]  # S11 is checked first
    assert "hold every 64th frame" in err[0] and "choose a multiple of 64" in err[0]
    assert "docs/human36m.md" in err[0]
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written
    for bad in ("0", "-64"):
        assert cli.main([*argv, "--test-every", bad]) == 2
        assert f"--test-every must be a whole number >= 1, got {bad}" in capsys.readouterr().err


def test_test_every_on_a_tree_of_every_frame(tmp_path):
    """A tree made with every test frame (h36m-fetch's select_frame_indices_to_include changed):
    --test-every 5 keeps frames 1, 6, 11 of each test video; without it, every frame."""
    root = fetch_layout(tmp_path / "processed", test_frames=tuple(range(1, 13)))
    result = convert(root, tmp_path / "all", progress=False)
    assert result["test_every"] == 1 and result["frame_selection"]["test"] == "every frame"
    result = convert(root, tmp_path / "five", progress=False, test_every=5)
    assert result["test_every"] == 5
    with h5py.File(result["test"]) as f:
        assert f["frame"][:].tolist() == [1] + [1, 6, 11] * 2  # S11 (frames 1, 2), then S9
        assert f.attrs["frame_selection"].startswith(
            "every 5th frame (frame numbers 1, 6, 11, ...)"
        )


@pytest.mark.parametrize(
    "univ, move_mm", [(False, 45.0), (True, 25.0)], ids=["no pose/3d-univ", "moves under 40 mm"]
)
def test_training_frames_not_shown_to_follow_the_40_mm_rule(tmp_path, univ, move_mm):
    """Irregular training frames are called h36m-fetch's motion selection only when pose/3d-univ
    shows every kept frame at least 40 mm from the last; otherwise they are called irregular."""
    root = fetch_layout(tmp_path / "processed", train_move_mm=move_mm, univ=univ)
    result = convert(root, tmp_path / "out", progress=False)
    text = "the frames the tree holds, with irregular gaps (no regular step)"
    assert result["frame_selection"]["train"] == text
    assert attrs_of(result["train"])["frame_selection"] == text


def test_frame_selection_helpers():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 64, 111, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "64th", "111th", "112th",
    ]  # fmt: skip
    assert regular_step([np.array([1, 65, 129]), np.array([1, 65])]) == 64
    assert regular_step([np.array([1, 65, 129]), np.array([1, 33])]) == 0  # two steps
    assert regular_step([np.array([2, 66])]) == 0  # not from frame 1
    assert regular_step([np.array([1, 4, 7, 11])]) == 0  # a gap
    assert regular_step([np.array([1]), np.array([1])]) == 0  # no step to tell


# ----------------------------------------------------------------------------------------------
# Other layouts: one line each, naming the path and the recipe


def run_cli(argv, capsys) -> tuple:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    prefix = "raypose data h36m: error: "
    assert err[0].startswith(prefix), err
    return rc, err[0][len(prefix) :]


def touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_original_release_layout(tmp_path, capsys):
    root = tmp_path / "h36m"
    touch(root / "S1" / "MyPoseFeatures" / "D3_Positions" / "Walking.cdf")
    touch(root / "S1" / "Videos" / "Walking.54138969.mp4")
    rc, message = run_cli(
        ["data", "h36m", "--root", str(root), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2
    assert message.startswith(
        f"{root}: holds the original Human3.6M release (S1/MyPoseFeatures/D3_Positions/Walking.cdf"
    )
    assert "h36m-fetch" in message and "process_all.py" in message
    assert "docs/human36m.md shows how" in message
    assert not (tmp_path / "o").exists()
    # h36m-fetch's own working folder before process_all.py: archives/ and extracted/
    work = tmp_path / "h36m-fetch"
    touch(work / "archives" / "Videos_S1.tgz")
    touch(work / "extracted" / "S1" / "Poses_D3_Positions" / "Walking.cdf")
    with pytest.raises(DataError, match=r"holds the original Human3\.6M release \(extracted/S1/"):
        convert(work, tmp_path / "o", progress=False)
    archives = tmp_path / "archives-only"
    touch(archives / "archives" / "Videos_S1.tgz")
    with pytest.raises(DataError, match=r"holds archives \(archives/Videos_S1\.tgz\).*extract_all"):
        convert(archives, tmp_path / "o", progress=False)


def test_image_less_pose_files(tmp_path, capsys):
    """VideoPose3D's data_3d_h36m.npz (a pickled dict inside: its names are listed without
    unpickling anything), given as --root or found inside it, and an HDF5 of poses only."""
    npz = tmp_path / "data_3d_h36m.npz"
    np.savez(npz, positions_3d=np.array({"S1": {"Walking": np.zeros((5, 32, 3))}}, dtype=object))
    rc, message = run_cli(
        ["data", "h36m", "--root", str(npz), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2
    assert message == (
        f"{npz}: a pose file without images (arrays: positions_3d), like VideoPose3D's "
        "data_3d_h36m.npz; raypose trains on image crops, so it needs h36m-fetch's processed tree "
        "(<subject>/<action>-<subaction>/annot.h5 with imageSequence/<camera>/img_%06d.jpg) as "
        "--root; see docs/human36m.md"
    )
    folder = tmp_path / "videopose"
    inside = folder / "data" / "data_2d_h36m_gt.npz"
    inside.parent.mkdir(parents=True)
    np.savez(inside, positions_2d=np.zeros(3), metadata=np.zeros(1))
    rc, message = run_cli(
        ["data", "h36m", "--root", str(folder), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and message.startswith(f"{inside}: a pose file without images (arrays: ")
    poses = tmp_path / "poses.h5"
    with h5py.File(poses, "w") as f:
        f["poses_3d"] = np.zeros((4, 17, 3))
        f["subject"] = np.array([b"S1"] * 4)
    rc, message = run_cli(
        ["data", "h36m", "--root", str(poses), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2
    assert message.startswith(f"{poses}: a pose file without images (arrays: poses_3d, subject);")
    assert "VideoPose3D" not in message
    assert not (tmp_path / "o").exists()


def test_other_files_and_folders_say_what_to_pass(tree, tmp_path, capsys):
    root, _ = tree
    with pytest.warns(UserWarning):
        convert(root, tmp_path / "data", progress=False)
    split = tmp_path / "data" / "train.h5"
    _, message = run_cli(
        ["data", "h36m", "--root", str(split), "--out", str(tmp_path / "o")], capsys
    )
    assert message.startswith(f"{split}: is already raypose's HDF5 split file")
    assert "--data" in message and str(tmp_path / "data") in message
    annot = root / "S1" / "Walking-1" / "annot.h5"
    _, message = run_cli(
        ["data", "h36m", "--root", str(annot), "--out", str(tmp_path / "o")], capsys
    )
    assert message.startswith(f"{annot}: is one sequence's annotations; pass the processed/ folder")
    # h36m-fetch's folder, which holds processed/: the path to pass
    with pytest.raises(DataError, match=rf"pass its processed tree as --root: --root {root}$"):
        convert(root.parent, tmp_path / "o", progress=False)
    # one subject's folder
    with pytest.raises(DataError, match=r"S1: holds sequences \(Walking-1/annot\.h5\)"):
        convert(root / "S1", tmp_path / "o", progress=False)
    assert (REPO / RECIPE).is_file()  # the recipe the messages point at
