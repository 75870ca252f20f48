"""raypose's HDF5 schema: one file per split (train.h5, test.h5), written by `raypose data synth`
and `raypose data h36m`, read by raypose.data.dataset.

## Datasets (all with the same number of rows N >= 1; row i is one sample)

| key | shape | dtype | meaning |
|---|---|---|---|
| `images` | (N, 128, 128, 3) | uint8 | RGB crop of the person's square box, resized to 128 x 128 |
| `joints_3d` | (N, 17, 3) | float32 | joints in camera coordinates, mm (x right, y down, z forward); absolute, not root-relative |
| `joints_2d` | (N, 17, 2) | float32 | joints in crop pixels (x right, y down); see the pixel convention below |
| `subject` | (N,) | UTF-8 str | subject id, e.g. "S1" |
| `action` | (N,) | UTF-8 str | action name, e.g. "walk" (synth) or "Walking" (h36m) |
| `camera` | (N,) | UTF-8 str | camera id, e.g. "54138969" |
| `frame` | (N,) | int32 | h36m: the video frame number; synth: position in the action's cycle, in 1/1000 cycle |

Joints follow raypose.data.skeleton.H36M_SKELETON (17 joints, Human3.6M order; the file's `skeleton`
attribute repeats names, parents and left/right lists). Strings are variable-length UTF-8 (h5py
`string_dtype('utf-8')`). Every dataset is chunked along the sample axis only and uncompressed
(64 rows per chunk for images and poses, 1024 for the labels, which readers load whole), so a batch
of sorted rows is a few contiguous reads. The mapping from 3D to 2D is not
stored: 2D joints are the projection of the 3D joints into the original image, moved into the crop.

Pixel convention: continuous coordinates with the origin at the top-left corner of the crop. Pixel
(row i, column j) covers x in [j, j + 1) and y in [i, i + 1); its centre is (j + 0.5, i + 0.5).
A point is inside the crop when 0 <= x < 128 and 0 <= y < 128. With this convention a resize by s maps
x to s * x, a crop at offset (ox, oy) maps x to x - ox, and a left/right mirror of a width-W image
maps x to W - x.

## File attributes

| attribute | type | meaning |
|---|---|---|
| `schema_version` | int | 1 (this document); readers refuse any other value |
| `skeleton` | JSON str | {"names": [...], "parents": [...], "joints_left": [...], "joints_right": [...]} |
| `source` | str | "synth" or "h36m" |
| `rgb_mean` | float32 (3,) | per-channel mean of the written images, pixel values scaled to [0, 1] |
| `rgb_eigval` | float32 (3,) | square roots of the eigenvalues of the 3 x 3 RGB covariance (pixels scaled to [0, 1]), descending: the standard deviation along each principal colour axis |
| `rgb_eigvec` | float32 (3, 3) | the matching unit eigenvectors as columns (`rgb_eigvec[:, k]`) |
| `mirror_consistent` | bool, optional (default true) | whether a left/right mirror of a sample, with the joints' left and right labels swapped, looks like a sample of this data. Synthetic data with a fixed side-colour code (left limbs warm) writes false; readers then train without the flip augmentation |

The colour statistics are computed over the written images (every 4th pixel in each direction of
every image) and drive the AlexNet PCA colour noise: per sample, alpha ~ N(0, sigma) for each of the
3 axes, and `rgb_eigvec @ (alpha * rgb_eigval)` is added to every pixel (on the [0, 1] scale);
readers refuse NaN or inf in them. The splits of one folder share one skeleton: readers refuse a
test.h5 whose `skeleton` differs from the train.h5 beside it (raypose.data.dataset.PoseDataset).
Producers may add more attributes; readers ignore them.

## Writing and checking

`SplitWriter` appends validated batches to a temporary file next to the target and renames it into
place only when the whole split was written, so a failed write never destroys an existing file.
`validate_file` checks a file against this schema; every problem raises `DataError` naming the file
and the key.
"""

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from raypose.data.skeleton import H36M_SKELETON, Skeleton

SCHEMA_VERSION = 1
IMAGE_SIZE = 128
NUM_JOINTS = 17
CHUNK_ROWS = 64  # rows per chunk of images and poses (one image chunk: 3 MiB)
LABEL_CHUNK_ROWS = 1024  # rows per chunk of subject/action/camera/frame (read whole, at open)
SOURCES = ("synth", "h36m")
PCA_PIXEL_STRIDE = 4  # colour statistics use every 4th pixel along each axis

STRING_KEYS = ("subject", "action", "camera")
# key -> (shape after the sample axis, dtype description); strings handled apart
ARRAY_KEYS = {
    "images": ((IMAGE_SIZE, IMAGE_SIZE, 3), np.dtype(np.uint8)),
    "joints_3d": ((NUM_JOINTS, 3), np.dtype(np.float32)),
    "joints_2d": ((NUM_JOINTS, 2), np.dtype(np.float32)),
    "frame": ((), np.dtype(np.int32)),
}
KEYS = ("images", "joints_3d", "joints_2d", "subject", "action", "camera", "frame")
POSE_KEYS = ("joints_3d", "joints_2d")
_STR = h5py.string_dtype("utf-8")


class DataError(ValueError):
    """A data file or array that does not follow the schema; the message names the file and the key."""


def skeleton_json(skeleton: Skeleton = H36M_SKELETON) -> str:
    return json.dumps(
        {
            "names": list(skeleton.names),
            "parents": list(skeleton.parents),
            "joints_left": list(skeleton.joints_left),
            "joints_right": list(skeleton.joints_right),
        }
    )


def _expected_shape(key: str) -> str:
    tail = ARRAY_KEYS[key][0] if key in ARRAY_KEYS else ()
    return "(N" + "".join(f", {s}" for s in tail) + ")"


def _first_nonfinite_row(array: np.ndarray) -> int:
    """Row index of the first NaN/inf, or -1."""
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else -1


# ----------------------------------------------------------------------------------------------
# writing


class _ColourStats:
    """Running mean and covariance of RGB pixels on the [0, 1] scale (float64 sums)."""

    def __init__(self):
        self.count = 0
        self.sum = np.zeros(3)
        self.outer = np.zeros((3, 3))

    def update(self, images: np.ndarray) -> None:
        pixels = (
            images[:, ::PCA_PIXEL_STRIDE, ::PCA_PIXEL_STRIDE].reshape(-1, 3).astype(np.float64)
            / 255.0
        )
        self.count += len(pixels)
        self.sum += pixels.sum(axis=0)
        self.outer += pixels.T @ pixels

    def attrs(self) -> dict:
        mean = self.sum / max(self.count, 1)
        cov = self.outer / max(self.count, 1) - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigval)[::-1]
        eigval = np.sqrt(np.clip(eigval[order], 0.0, None))
        return {
            "rgb_mean": mean.astype(np.float32),
            "rgb_eigval": eigval.astype(np.float32),
            "rgb_eigvec": eigvec[:, order].astype(np.float32),
        }


class SplitWriter:
    """Writes one split file batch by batch; the file appears (atomically) only on success.

        with SplitWriter("data/synth/train.h5", source="synth") as writer:
            writer.append(images=..., joints_3d=..., joints_2d=..., subject=[...], action=[...],
                          camera=[...], frame=...)

    Every batch is validated first (shapes, dtypes, NaN/inf in poses, equal lengths); a bad batch
    raises DataError naming the target file and the key. Rows go to a temporary file in the same
    directory, which replaces the target by rename in close() after a final validate_file; if
    anything fails (or the with-block raises) the temporary file is removed and an existing target
    is left untouched. Writing zero rows is an error (an empty split is never written).
    """

    def __init__(
        self,
        path,
        source: str,
        attrs: dict | None = None,
        skeleton: Skeleton = H36M_SKELETON,
        chunk_rows: int = CHUNK_ROWS,
    ):
        if source not in SOURCES:
            raise DataError(f"{path}: attribute 'source' must be one of {SOURCES}, got {source!r}")
        if skeleton.num_joints != NUM_JOINTS:
            raise DataError(
                f"{path}: attribute 'skeleton' must have {NUM_JOINTS} joints, "
                f"got {skeleton.num_joints}"
            )
        self.path = Path(path)
        self.source = source
        self.extra_attrs = dict(attrs or {})
        self.skeleton = skeleton
        self.chunk_rows = int(chunk_rows)
        self.n = 0
        self._stats = _ColourStats()
        self._file = None
        self._tmp = None

    # context manager ---------------------------------------------------------------------------
    def __enter__(self) -> "SplitWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(fd)
        self._tmp = Path(tmp)
        self._file = h5py.File(self._tmp, "w")
        for key in KEYS:
            tail, dtype = ARRAY_KEYS.get(key, ((), _STR))
            rows = self.chunk_rows if key in ("images",) + POSE_KEYS else LABEL_CHUNK_ROWS
            self._file.create_dataset(
                key, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(rows, *tail)
            )

    # validation --------------------------------------------------------------------------------
    def _error(self, key: str, what: str) -> DataError:
        return DataError(f"{self.path}: key '{key}': {what}")

    def validate_batch(self, **arrays) -> dict:
        """Checks one batch and returns it converted to the stored dtypes (no silent casts of
        images or of non-float poses)."""
        missing = [k for k in KEYS if k not in arrays]
        unknown = [k for k in arrays if k not in KEYS]
        if missing:
            raise self._error(missing[0], f"missing from the batch; expected all of {list(KEYS)}")
        if unknown:
            raise self._error(unknown[0], f"unknown key; expected only {list(KEYS)}")
        out = {}
        lengths = {}
        for key in KEYS:
            value = arrays[key]
            if key in STRING_KEYS:
                if isinstance(value, (str, bytes)):
                    raise self._error(
                        key, "expected a sequence of str, one per sample, got one str"
                    )
                values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
                if not all(isinstance(v, (str, np.str_)) for v in values):
                    raise self._error(key, "expected str values")
                out[key] = np.array([str(v) for v in values], dtype=object)
            else:
                tail, dtype = ARRAY_KEYS[key]
                array = np.asarray(value)
                if array.ndim != 1 + len(tail) or array.shape[1:] != tail:
                    raise self._error(
                        key, f"expected shape {_expected_shape(key)}, got {array.shape}"
                    )
                if key == "images" and array.dtype != np.uint8:
                    raise self._error(key, f"expected dtype uint8, got {array.dtype}")
                if key in POSE_KEYS:
                    if not np.issubdtype(array.dtype, np.floating):
                        raise self._error(
                            key, f"expected a float dtype (stored as float32), got {array.dtype}"
                        )
                    row = _first_nonfinite_row(array)
                    if row >= 0:
                        raise self._error(
                            key, f"NaN or inf in row {row} of the batch; poses must be finite"
                        )
                if key == "frame":
                    if not np.issubdtype(array.dtype, np.integer):
                        raise self._error(
                            key, f"expected an integer dtype (stored as int32), got {array.dtype}"
                        )
                    limits = np.iinfo(np.int32)
                    if array.size and (array.min() < limits.min or array.max() > limits.max):
                        raise self._error(key, "values do not fit int32")
                out[key] = array.astype(dtype, copy=False)
            lengths[key] = len(out[key])
        if len(set(lengths.values())) != 1:
            raise self._error("images", f"all keys need the same number of rows, got {lengths}")
        return out

    def append(self, **arrays) -> None:
        if self._file is None:
            raise RuntimeError("SplitWriter.append outside its with-block (or after close)")
        batch = self.validate_batch(**arrays)
        b = len(batch["images"])
        if b == 0:
            return
        for key in KEYS:
            ds = self._file[key]
            ds.resize(self.n + b, axis=0)
            ds[self.n : self.n + b] = batch[key]
        self._stats.update(batch["images"])
        self.n += b

    # finishing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Writes the attributes, validates the temporary file and renames it onto the target."""
        if self._file is None:
            return
        try:
            if self.n == 0:
                raise DataError(
                    f"{self.path}: key 'images': no samples were written; an empty split "
                    f"is not written (expected at least 1 row)"
                )
            attrs = self._file.attrs
            attrs["schema_version"] = SCHEMA_VERSION
            attrs["skeleton"] = skeleton_json(self.skeleton)
            attrs["source"] = self.source
            for key, value in self._stats.attrs().items():
                attrs[key] = value
            for key, value in self.extra_attrs.items():
                attrs[key] = value
            self._file.close()
            self._file = None
            validate_file(self._tmp, display_name=self.path)
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drops the temporary file; the target is untouched."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def write_split(
    path,
    *,
    attrs: dict | None = None,
    source: str = "synth",
    skeleton: Skeleton = H36M_SKELETON,
    **arrays,
) -> Path:
    """One-shot SplitWriter: write_split(path, images=..., joints_3d=..., ..., frame=...)."""
    with SplitWriter(path, source=source, attrs=attrs, skeleton=skeleton) as writer:
        writer.append(**arrays)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# checking


def _unique_strings(ds, rows_per_read: int = 1 << 16) -> list:
    values = set()
    for start in range(0, ds.shape[0], rows_per_read):
        values.update(ds.asstr()[start : start + rows_per_read].tolist())
    return sorted(values)


def validate_file(path, check_values: bool = True, display_name=None) -> dict:
    """Checks a split file against the schema and returns a summary:

    {'path', 'n', 'subjects', 'actions', 'cameras', 'source', 'schema_version', 'joint_names',
     'skeleton', 'mirror_consistent', 'rgb_mean', 'rgb_eigval', 'rgb_eigvec'}

    skeleton: the attribute's names, parents, joints_left and joints_right, as lists.

    Raises DataError (naming the file and the key) for a missing file, a file that is not HDF5, a
    missing dataset or attribute, a wrong shape or dtype, rows that disagree in number, an empty
    file, a wrong schema_version, NaN/inf in the colour statistics, and (check_values=True)
    NaN/inf in joints_3d or joints_2d.
    """
    path = Path(path)
    name = display_name or path

    def error(key, what):
        return DataError(f"{name}: key '{key}': {what}")

    if not path.exists():
        raise DataError(
            f"{name}: file not found (expected an HDF5 split file with key 'images' "
            f"and the rest of raypose schema v{SCHEMA_VERSION})"
        )
    if path.is_dir():
        raise DataError(f"{name}: is a directory, expected an HDF5 split file")
    if not h5py.is_hdf5(path):
        raise DataError(f"{name}: not an HDF5 file (expected raypose schema v{SCHEMA_VERSION})")
    # a truncated or damaged file passes is_hdf5 (its superblock is intact) and fails on open or
    # on the first read with h5py's OSError: one DataError naming the file instead
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if "schema_version" not in attrs:
                raise error("schema_version", f"attribute missing; expected {SCHEMA_VERSION}")
            version = attrs["schema_version"]
            version = version.tolist() if isinstance(version, np.ndarray | np.generic) else version
            if not isinstance(version, int) or version != SCHEMA_VERSION:
                raise error("schema_version", f"expected {SCHEMA_VERSION}, got {version!r}")
            if "skeleton" not in attrs:
                raise error("skeleton", "attribute missing; expected the skeleton as JSON")
            try:
                skeleton = json.loads(attrs["skeleton"])
                joint_names = list(skeleton["names"])
                parents = list(skeleton["parents"])
            except (TypeError, ValueError, KeyError) as exc:
                raise error(
                    "skeleton", f"expected JSON with names/parents/joints_left/joints_right ({exc})"
                ) from None
            if len(joint_names) != NUM_JOINTS or len(parents) != NUM_JOINTS:
                raise error("skeleton", f"expected {NUM_JOINTS} joints, got {len(joint_names)}")
            skeleton = _skeleton_summary(skeleton)
            source = attrs.get("source")
            if source is None:
                raise error("source", f"attribute missing; expected one of {SOURCES}")
            source = source.decode() if isinstance(source, bytes) else str(source)
            colour = {}
            for key, shape in (("rgb_mean", (3,)), ("rgb_eigval", (3,)), ("rgb_eigvec", (3, 3))):
                if key not in attrs:
                    raise error(key, f"attribute missing; expected float array of shape {shape}")
                value = np.asarray(attrs[key])
                if value.shape != shape or not np.issubdtype(value.dtype, np.floating):
                    raise error(
                        key,
                        f"attribute: expected float array of shape {shape}, "
                        f"got {value.dtype} {value.shape}",
                    )
                if not np.isfinite(value).all():
                    # the PCA colour noise adds rgb_eigvec @ (alpha * rgb_eigval) to every pixel:
                    # one NaN makes every training image, and then the loss, NaN
                    raise error(
                        key,
                        f"attribute holds NaN or inf ({value.tolist()}); the colour "
                        "statistics must be finite: write the file again",
                    )
                colour[key] = value.astype(np.float32)

            mirror = attrs.get("mirror_consistent", True)
            mirror = mirror.tolist() if isinstance(mirror, np.ndarray | np.generic) else mirror
            if not isinstance(mirror, bool):
                raise error("mirror_consistent", f"attribute: expected a bool, got {mirror!r}")

            n = None
            for key in KEYS:
                if key not in f:
                    raise error(key, f"dataset missing; expected shape {_expected_shape(key)}")
                ds = f[key]
                if not isinstance(ds, h5py.Dataset):
                    raise error(key, "expected a dataset, found a group")
                if key in STRING_KEYS:
                    if ds.ndim != 1:
                        raise error(key, f"expected shape (N,), got {ds.shape}")
                    if h5py.check_string_dtype(ds.dtype) is None:
                        raise error(
                            key, f"expected variable-length UTF-8 strings, got dtype {ds.dtype}"
                        )
                else:
                    tail, dtype = ARRAY_KEYS[key]
                    if ds.ndim != 1 + len(tail) or ds.shape[1:] != tail:
                        raise error(key, f"expected shape {_expected_shape(key)}, got {ds.shape}")
                    if ds.dtype != dtype:
                        raise error(key, f"expected dtype {dtype}, got {ds.dtype}")
                if n is None:
                    n = ds.shape[0]
                elif ds.shape[0] != n:
                    raise error(key, f"expected {n} rows like 'images', got {ds.shape[0]}")
            if n == 0:
                raise error("images", "file is empty (0 samples); expected at least 1 row")
            if check_values:
                rows = 1 << 16
                for key in POSE_KEYS:
                    ds = f[key]
                    for start in range(0, n, rows):
                        row = _first_nonfinite_row(ds[start : start + rows])
                        if row >= 0:
                            raise error(
                                key, f"NaN or inf in row {start + row}; poses must be finite"
                            )
            return {
                "path": str(path),
                "n": int(n),
                "source": source,
                "schema_version": int(version),
                "joint_names": joint_names,
                "skeleton": skeleton,
                "subjects": _unique_strings(f["subject"]),
                "actions": _unique_strings(f["action"]),
                "cameras": _unique_strings(f["camera"]),
                "mirror_consistent": mirror,
                **colour,
            }
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{name}: cannot be read as HDF5 ({reason}); the file is truncated or "
            "damaged, write it again"
        ) from None


SKELETON_FIELDS = ("names", "parents", "joints_left", "joints_right")


def _skeleton_summary(skeleton: dict) -> dict:
    """The skeleton attribute's fields as plain lists (absent left/right lists as empty ones)."""
    return {k: list(skeleton.get(k, [])) for k in SKELETON_FIELDS}


def read_skeleton(source) -> dict | None:
    """A split file's skeleton attribute (validate_file's 'skeleton') from its path or its open
    h5py.File, read without checking the rest of the file; None when it cannot be read
    (validate_file says why, for that file)."""
    try:
        if isinstance(source, h5py.File):
            return _skeleton_summary(json.loads(source.attrs["skeleton"]))
        with h5py.File(source, "r") as f:
            return _skeleton_summary(json.loads(f.attrs["skeleton"]))
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return None


def check_same_skeleton(path, skeleton: dict, reference_path, reference: dict) -> None:
    """DataError naming both files when the skeleton of `path` differs from that of
    `reference_path`: joints are stored by index, so a model that learnt one file's order would
    read the other's joints as different ones."""
    for key in SKELETON_FIELDS:
        ours, theirs = list(skeleton.get(key, [])), list(reference.get(key, []))
        if ours == theirs:
            continue
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
        )
        ours_at = repr(ours[at]) if at < len(ours) else "nothing"
        theirs_at = repr(theirs[at]) if at < len(theirs) else "nothing"
        raise DataError(
            f"{path}: key 'skeleton': differs from the skeleton of {reference_path} "
            f"({key}[{at}] is {ours_at} here and {theirs_at} there); both splits "
            "must list the same joints in the same order: write them with the same "
            "skeleton"
        )
