"""The HDF5 split schema: round trip, colour statistics, and one clear DataError per kind of bad
file or batch, each naming the file and the key."""

import json

import h5py
import numpy as np
import pytest

from raypose.data.schema import (
    KEYS,
    SCHEMA_VERSION,
    DataError,
    SplitWriter,
    validate_file,
    write_split,
)


def make_arrays(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8),
        "joints_3d": rng.normal(0, 300, (n, 17, 3)).astype(np.float32) + np.float32([0, 0, 4000]),
        "joints_2d": rng.uniform(0, 128, (n, 17, 2)).astype(np.float32),
        "subject": ["S1" if i % 2 else "S5" for i in range(n)],
        "action": ["walk" if i % 3 else "sit" for i in range(n)],
        "camera": ["54138969"] * n,
        "frame": np.arange(n, dtype=np.int32),
    }


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "train.h5"
    write_split(path, source="synth", **make_arrays(10))
    return path


def test_round_trip_and_layout(good_file):
    info = validate_file(good_file)
    assert info["n"] == 10
    assert info["subjects"] == ["S1", "S5"]
    assert info["actions"] == ["sit", "walk"]
    assert info["cameras"] == ["54138969"]
    assert info["source"] == "synth" and info["schema_version"] == SCHEMA_VERSION == 1
    assert info["joint_names"][0] == "Hip" and info["joint_names"][16] == "RWrist"
    arrays = make_arrays(10)
    with h5py.File(good_file, "r") as f:
        assert set(KEYS) <= set(f.keys())
        assert f["images"].chunks == (64, 128, 128, 3)  # chunked along samples only
        assert f["images"].compression is None
        np.testing.assert_array_equal(f["images"][:], arrays["images"])
        np.testing.assert_array_equal(f["joints_3d"][:], arrays["joints_3d"])
        assert f["subject"].asstr()[1] == "S1" and f["frame"].dtype == np.int32
        skeleton = json.loads(f.attrs["skeleton"])
        assert skeleton["parents"][:4] == [-1, 0, 1, 2] and skeleton["joints_left"] == [
            4,
            5,
            6,
            11,
            12,
            13,
        ]
    # no temporary file left behind
    assert [p.name for p in good_file.parent.iterdir()] == ["train.h5"]


def test_colour_pca_of_grey_images(tmp_path):
    # half the images black, half white: every pixel is grey, so the RGB covariance is
    # 0.25 * ones(3, 3) on the [0, 1] scale; its only non-zero eigenvalue is 0.75 along
    # (1, 1, 1) / sqrt(3), and rgb_eigval holds its square root, sqrt(0.75) = 0.8660.
    arrays = make_arrays(4)
    arrays["images"] = np.zeros((4, 128, 128, 3), np.uint8)
    arrays["images"][2:] = 255
    path = write_split(tmp_path / "grey.h5", **arrays)
    info = validate_file(path)
    np.testing.assert_allclose(info["rgb_eigval"], [0.8660254, 0, 0], atol=1e-3)
    np.testing.assert_allclose(np.abs(info["rgb_eigvec"][:, 0]), [0.57735] * 3, atol=1e-4)
    np.testing.assert_allclose(info["rgb_mean"], [0.5, 0.5, 0.5], atol=1e-6)


def _rewrite(path, key, value=None, delete=False):
    with h5py.File(path, "a") as f:
        del f[key]
        if not delete:
            f.create_dataset(key, data=value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.h5.*not found.*'images'"):
        validate_file(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"text\.h5: not an HDF5 file"):
        validate_file(path)


def test_missing_key(good_file):
    _rewrite(good_file, "joints_2d", delete=True)
    with pytest.raises(DataError, match=r"train\.h5: key 'joints_2d': dataset missing"):
        validate_file(good_file)


def test_wrong_shape(good_file):
    _rewrite(good_file, "joints_3d", np.zeros((10, 16, 3), np.float32))
    with pytest.raises(
        DataError,
        match=r"train\.h5: key 'joints_3d': expected shape \(N, 17, 3\), got \(10, 16, 3\)",
    ):
        validate_file(good_file)


def test_wrong_dtype(good_file):
    _rewrite(good_file, "images", np.zeros((10, 128, 128, 3), np.float32))
    with pytest.raises(
        DataError, match=r"train\.h5: key 'images': expected dtype uint8, got float32"
    ):
        validate_file(good_file)


def test_nan_in_poses(good_file):
    with h5py.File(good_file, "a") as f:
        f["joints_3d"][7, 3, 1] = np.nan
    with pytest.raises(DataError, match=r"train\.h5: key 'joints_3d': NaN or inf in row 7"):
        validate_file(good_file)


def test_rows_disagree(good_file):
    _rewrite(good_file, "frame", np.arange(9, dtype=np.int32))
    with pytest.raises(DataError, match=r"train\.h5: key 'frame': expected 10 rows"):
        validate_file(good_file)


def test_wrong_schema_version(good_file):
    with h5py.File(good_file, "a") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(DataError, match=r"train\.h5: key 'schema_version': expected 1, got 2"):
        validate_file(good_file)


def test_mirror_consistent_defaults_to_true_and_must_be_a_bool(good_file):
    assert validate_file(good_file)["mirror_consistent"] is True  # no attribute: flip allowed
    with h5py.File(good_file, "a") as f:
        f.attrs["mirror_consistent"] = False
    assert validate_file(good_file)["mirror_consistent"] is False
    with h5py.File(good_file, "a") as f:
        f.attrs["mirror_consistent"] = "no"
    with pytest.raises(
        DataError, match=r"train\.h5: key 'mirror_consistent': attribute: expected a bool"
    ):
        validate_file(good_file)


def test_empty_file(good_file):
    with h5py.File(good_file, "a") as f:
        for key in KEYS:
            f[key].resize(0, axis=0)
    with pytest.raises(DataError, match=r"train\.h5: key 'images': file is empty"):
        validate_file(good_file)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "joints_3d",
            np.full((10, 17, 3), np.nan, np.float32),
            r"key 'joints_3d': NaN or inf in row 0",
        ),
        (
            "joints_2d",
            np.zeros((10, 17, 3), np.float32),
            r"key 'joints_2d': expected shape \(N, 17, 2\)",
        ),
        ("images", np.zeros((10, 128, 128, 3), np.float32), r"key 'images': expected dtype uint8"),
        ("joints_3d", np.zeros((10, 17, 3), np.int64), r"key 'joints_3d': expected a float dtype"),
        ("frame", np.arange(9), r"key 'images': all keys need the same number of rows"),
    ],
)
def test_writer_rejects_bad_batch(tmp_path, key, value, message):
    arrays = make_arrays(10)
    arrays[key] = value
    with pytest.raises(DataError, match=r"out\.h5: " + message):
        write_split(tmp_path / "out.h5", **arrays)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_writer_refuses_empty_split(tmp_path):
    with pytest.raises(DataError, match=r"empty\.h5: key 'images': no samples were written"):
        with SplitWriter(tmp_path / "empty.h5", source="synth"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_existing_file_untouched(good_file):
    before = good_file.read_bytes()
    # an exception in the with-block after some rows were appended
    with pytest.raises(RuntimeError, match="renderer crashed"):
        with SplitWriter(good_file, source="synth") as writer:
            writer.append(**make_arrays(5, seed=1))
            raise RuntimeError("renderer crashed")
    # a bad batch in the middle of a write
    with pytest.raises(DataError, match="NaN"):
        with SplitWriter(good_file, source="synth") as writer:
            writer.append(**make_arrays(5, seed=2))
            bad = make_arrays(5, seed=3)
            bad["joints_2d"][4, 0, 0] = np.inf
            writer.append(**bad)
    assert good_file.read_bytes() == before
    assert [p.name for p in good_file.parent.iterdir()] == ["train.h5"]
    assert validate_file(good_file)["n"] == 10
    # and a successful write replaces it
    write_split(good_file, source="h36m", **make_arrays(3, seed=4))
    assert validate_file(good_file)["n"] == 3 and validate_file(good_file)["source"] == "h36m"


@pytest.mark.parametrize(
    "key, index, value",
    [
        ("rgb_eigval", (1,), np.nan),
        ("rgb_eigvec", (2, 0), np.inf),
        ("rgb_eigvec", (0, 1), -np.inf),
        ("rgb_mean", (0,), np.nan),
    ],
)
def test_non_finite_colour_statistics_are_refused(good_file, key, index, value):
    # the PCA colour noise adds rgb_eigvec @ (alpha * rgb_eigval) to every training pixel
    with h5py.File(good_file, "a") as f:
        stats = np.array(f.attrs[key])
        stats[index] = value
        f.attrs[key] = stats
    with pytest.raises(DataError, match=rf"train\.h5: key '{key}': attribute holds NaN or inf"):
        validate_file(good_file)
    # the one check that reads no rows refuses it too
    with pytest.raises(DataError, match=rf"key '{key}'"):
        validate_file(good_file, check_values=False)


def test_summary_holds_the_skeleton_and_skeletons_are_compared(tmp_path, good_file):
    from raypose.data.schema import check_same_skeleton, read_skeleton
    from raypose.data.skeleton import H36M_SKELETON

    info = validate_file(good_file)
    assert info["skeleton"] == {
        "names": list(H36M_SKELETON.names),
        "parents": list(H36M_SKELETON.parents),
        "joints_left": list(H36M_SKELETON.joints_left),
        "joints_right": list(H36M_SKELETON.joints_right),
    }
    assert read_skeleton(good_file) == info["skeleton"]
    with h5py.File(good_file, "r") as f:
        assert read_skeleton(f) == info["skeleton"]
    assert read_skeleton(tmp_path / "absent.h5") is None
    check_same_skeleton("a.h5", info["skeleton"], "b.h5", read_skeleton(good_file))  # equal: fine

    other = json.loads(json.dumps(info["skeleton"]))
    other["parents"][3] = 0
    with pytest.raises(
        DataError,
        match=r"test\.h5: key 'skeleton': differs from the skeleton "
        r"of .*train\.h5 \(parents\[3\] is 0 here and 2 there\)",
    ):
        check_same_skeleton("test.h5", other, good_file, info["skeleton"])
    other = json.loads(json.dumps(info["skeleton"]))
    other["names"][1], other["names"][4] = other["names"][4], other["names"][1]
    with pytest.raises(DataError, match=r"names\[1\] is 'LHip' here and 'RHip' there"):
        check_same_skeleton("test.h5", other, good_file, info["skeleton"])
    other["names"] = other["names"][:16]
    with pytest.raises(DataError, match=r"names\[1\]"):
        check_same_skeleton("test.h5", other, good_file, info["skeleton"])
    shorter = json.loads(json.dumps(info["skeleton"]))
    shorter["joints_left"] = shorter["joints_left"][:5]
    with pytest.raises(DataError, match=r"joints_left\[5\] is nothing here and 13 there"):
        check_same_skeleton("test.h5", shorter, good_file, info["skeleton"])
