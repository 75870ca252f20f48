"""`raypose data h36m`: convert a processed Human3.6M tree into raypose's HDF5 splits.

Input (the layout of public download tools such as h36m-fetch):

    ROOT/<subject>/<action>-<subaction>/annot.h5
        pose/2d (N, 32, 2)  pixel coordinates in the camera image
        pose/3d (N, 32, 3)  camera coordinates, mm
        camera (N,)         camera id (int or str), e.g. 54138969
        frame (N,)          frame number, which names the JPEG
        subject (N,), action (N,)
        pose/3d-univ (N, 32, 3), optional: the poses h36m-fetch chose training frames on
    ROOT/<subject>/<action>-<subaction>/imageSequence/<camera>/img_%06d.jpg

Output: OUT/train.h5 (S1 S5 S6 S7 S8) and OUT/test.h5 (S9 S11), raypose.data.schema, source "h36m".
Subject and action names come from the directory names (annot.h5 of public tools stores them as
integer codes); a subject outside both splits is skipped with a warning.

Per row: the 17 joints [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27] of the 32; a
square box centred on the 2D joints' bounding box, with side (1 + margin) x its larger extent
(margin 0.2), rounded to whole pixels and padded with black where it leaves the image; resized to
128 x 128 with Pillow (bilinear, antialiased); 2D joints moved into the crop as
(x - x0) * 128 / side. The annotation's 2D coordinates are taken as continuous image coordinates
with the origin at the image's top-left corner (the pixel convention of raypose.data.schema).
The box comes from the ground-truth 2D joints for training and test rows alike (no person
detector): file attribute `crop_centred_on`.

Frames: the rows the tree holds. h36m-fetch's process_all.py keeps every 64th frame of S9 and S11
(frame numbers 1, 65, 129, ...) and, of a training subject's video, a frame once some joint has
moved 40 mm since the last kept frame. `describe_frames` reads which selection a split carries
from its frame numbers (and, for the 40 mm rule, from pose/3d-univ, the poses h36m-fetch selected
on); `--test-every N` keeps the test frames 1, 1 + N, 1 + 2N, ... and refuses an N whose frames
the tree lacks. Both files state the selection (attributes `frame_selection`, `test_every`).

Any other input (the original release's .cdf and .mp4, h36m-fetch's archives or extracted
folders, a pose file without images such as VideoPose3D's data_3d_h36m.npz) gets one line that
says what it is and what to do (`other_layout`); the recipe is docs/human36m.md.
"""

import argparse
import os
import time
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np

from raypose.data.cache import write_manifest
from raypose.data.schema import DataError, SplitWriter
from raypose.validate import InputError, existing_dir, output_dir, refuse_existing

H36M_17_OF_32 = [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27]
SPLITS = {"train": ("S1", "S5", "S6", "S7", "S8"), "test": ("S9", "S11")}
ANNOT_KEYS = ("pose/2d", "pose/3d", "camera", "frame", "subject", "action")
IMAGE_SIZE = 128
WRITE_BATCH = 256  # rows per SplitWriter.append
RECIPE = "docs/human36m.md"  # the real-data recipe every layout error points at
# h36m-fetch's process_all.py (select_frame_indices_to_include): a training frame is kept once
# some joint has moved this far since the last kept frame, measured on pose/3d-univ
MOTION_THRESHOLD_MM = 40.0
CROP_CENTRED_ON = "ground-truth 2D joints (training and test rows alike)"
SELECTION_ATTRS = ("frame_selection", "test_every", "crop_centred_on")
TREE_LAYOUT = "<subject>/<action>-<subaction>/annot.h5 with imageSequence/<camera>/img_%06d.jpg"


def split_of(subject: str):
    for split, subjects in SPLITS.items():
        if subject in subjects:
            return split
    return None


def find_sequences(root) -> list:
    """Sorted (subject, action, sequence dir) for every ROOT/<subject>/<action>-<subaction>/annot.h5.
    A root in another layout raises DataError saying what it holds and what to do."""
    root = Path(root)
    if root.is_file():
        raise DataError(other_layout(root))
    if not root.is_dir():
        raise DataError(
            f"{root}: Human3.6M root not found (expected h36m-fetch's processed/ folder: "
            f"{TREE_LAYOUT}; see {RECIPE})"
        )
    sequences = []
    for annot in sorted(root.glob("*/*/annot.h5")):
        seq = annot.parent
        action = seq.name.rsplit("-", 1)[0] if "-" in seq.name else seq.name
        sequences.append((seq.parent.name, action, seq))
    if not sequences:
        raise DataError(other_layout(root))
    return sequences


# ---------------------------------------------------------------------------------------------
# other layouts: one line that says what ROOT holds and what to do

# how deep and how far other_layout looks into a folder before it gives up
LAYOUT_DEPTH = 4
LAYOUT_MAX_ENTRIES = 20_000
POSE_FILE_SUFFIXES = (".npz", ".h5", ".hdf5")


def _first_files(root: Path) -> dict:
    """The first file of each kind under root, at most LAYOUT_DEPTH folders down:
    {'release': a .cdf or .mp4, 'archive': a .tgz, 'pose': a .npz/.h5/.hdf5 (not annot.h5)}."""
    found = {}
    seen = 0
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if depth >= LAYOUT_DEPTH:
            dirs[:] = []
        dirs.sort()
        for name in sorted(files):
            suffix = Path(name).suffix.lower()
            kind = (
                "release"
                if suffix in (".cdf", ".mp4")
                else "archive"
                if name.lower().endswith((".tgz", ".tar.gz"))
                else "pose"
                if suffix in POSE_FILE_SUFFIXES and name != "annot.h5"
                else None
            )
            if kind is not None:
                found.setdefault(kind, Path(folder) / name)
        seen += len(files) + len(dirs)
        if "release" in found or seen > LAYOUT_MAX_ENTRIES:
            break
    return found


def other_layout(root) -> str:
    """The one-line error for a --root that is not h36m-fetch's processed tree: a file, the
    original release, h36m-fetch's other folders, a pose file without images, or nothing known."""
    root = Path(root)
    if root.is_file():
        return pose_file_message(root)
    processed = root / "processed"
    if processed.is_dir() and any(processed.glob("*/*/annot.h5")):
        return (
            f"{root}: holds h36m-fetch's folders; pass its processed tree as --root: "
            f"--root {processed}"
        )
    one_up = sorted(root.glob("*/annot.h5"))
    if one_up:
        return (
            f"{root}: holds sequences ({one_up[0].relative_to(root)}) but no subject folders; "
            f"pass the folder above it, the one that holds S1, S5, ... S11, as --root"
        )
    found = _first_files(root)
    if "release" in found:
        return (
            f"{root}: holds the original Human3.6M release ({found['release'].relative_to(root)}: "
            f".cdf poses and .mp4 videos), which raypose does not read; make h36m-fetch's "
            f"processed tree from it with its process_all.py and pass that processed/ folder as "
            f"--root; {RECIPE} shows how, also for a release unpacked by hand"
        )
    if "pose" in found:
        return pose_file_message(found["pose"])
    if "archive" in found:
        return (
            f"{root}: holds archives ({found['archive'].relative_to(root)}), not the processed "
            f"tree; unpack and process them with h36m-fetch (extract_all.py, process_all.py) "
            f"and pass its processed/ folder as --root; see {RECIPE}"
        )
    return (
        f"{root}: no sequences found (expected h36m-fetch's processed tree: {TREE_LAYOUT}, "
        f"e.g. S1/Walking-1/annot.h5; see {RECIPE})"
    )


def _hdf5_datasets(path: Path) -> tuple:
    """({name: (shape, dtype)} of every dataset in an HDF5 file, its root attributes' names)."""
    datasets = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                datasets.__setitem__(name, (obj.shape, obj.dtype))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
        attrs = set(f.attrs)
    return datasets, attrs


def pose_file_message(path: Path) -> str:
    """What a single file given (or found) instead of the processed tree is, and what to do.
    Only the names and shapes of its arrays are read: nothing is unpickled."""
    tree = f"h36m-fetch's processed tree ({TREE_LAYOUT}) as --root"
    images = None
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:  # lists names; unpickles nothing
                keys = list(npz.files)
        elif h5py.is_hdf5(path):
            datasets, attrs = _hdf5_datasets(path)
            keys = list(datasets)
            if "images" in datasets and "schema_version" in attrs:
                return (
                    f"{path}: is already raypose's HDF5 split file; no conversion is needed: "
                    f"pass its folder {path.parent} as --data to train, tune or evaluate"
                )
            if "pose/3d" in datasets and "frame" in datasets:
                return (
                    f"{path}: is one sequence's annotations; pass the processed/ folder that "
                    f"holds the subject folders as --root ({TREE_LAYOUT})"
                )
            images = [
                k for k, (shape, dtype) in datasets.items() if len(shape) == 4 and dtype == np.uint8
            ]
        else:
            return f"{path}: is a file; raypose data h36m takes {tree}; see {RECIPE}"
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        return f"{path}: cannot be read ({exc}); raypose data h36m takes {tree}; see {RECIPE}"
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") if keys else "none"
    if images:
        return (
            f"{path}: holds images ({images[0]}) in a layout raypose does not convert; "
            f"make {tree}, see {RECIPE}, or write raypose's schema (docs/data-format.md)"
        )
    videopose = (
        ", like VideoPose3D's data_3d_h36m.npz"
        if {"positions_3d", "positions_2d"} & set(keys)
        else ""
    )
    return (
        f"{path}: a pose file without images (arrays: {shown}){videopose}; raypose trains "
        f"on image crops, so it needs {tree}; see {RECIPE}"
    )


def read_annotations(annot_path) -> dict:
    """The annot.h5 keys this converter needs, checked; camera ids as str, frames as int."""
    annot_path = Path(annot_path)
    try:
        f = h5py.File(annot_path, "r")
    except OSError as exc:
        raise DataError(f"{annot_path}: cannot be read as HDF5 ({exc})") from exc
    with f:
        for key in ANNOT_KEYS:
            if key not in f:
                raise DataError(
                    f"{annot_path}: key '{key}' missing; expected all of {list(ANNOT_KEYS)}"
                )
        pose_2d = np.asarray(f["pose/2d"][:], dtype=np.float64)
        pose_3d = np.asarray(f["pose/3d"][:], dtype=np.float64)
        camera = f["camera"][:]
        frame = f["frame"][:]
        # the poses h36m-fetch chose training frames on; optional (older trees, other tools)
        univ = f["pose/3d-univ"][:] if "pose/3d-univ" in f else None
    n = len(pose_2d)
    for key, array, tail in (("pose/2d", pose_2d, (32, 2)), ("pose/3d", pose_3d, (32, 3))):
        if array.shape[1:] != tail:
            raise DataError(
                f"{annot_path}: key '{key}': expected shape (N, {tail[0]}, {tail[1]}), "
                f"got {array.shape}"
            )
    for key, array in (("pose/3d", pose_3d), ("camera", camera), ("frame", frame)):
        if len(array) != n:
            raise DataError(
                f"{annot_path}: key '{key}': expected {n} rows like 'pose/2d', got {len(array)}"
            )
    if not np.issubdtype(frame.dtype, np.integer):
        raise DataError(f"{annot_path}: key 'frame': expected integers, got {frame.dtype}")
    if univ is not None and univ.shape != pose_3d.shape:
        raise DataError(
            f"{annot_path}: key 'pose/3d-univ': expected shape {pose_3d.shape} like 'pose/3d', "
            f"got {univ.shape}"
        )
    cameras = [c.decode() if isinstance(c, bytes) else str(c) for c in camera.tolist()]
    frame = frame.astype(np.int64)
    views = {c: np.flatnonzero(np.array(cameras) == c) for c in dict.fromkeys(cameras)}
    return {
        "pose_2d": pose_2d[:, H36M_17_OF_32],
        "pose_3d": pose_3d[:, H36M_17_OF_32],
        "camera": cameras,
        "frame": frame,
        # per camera, the frame numbers in the order the rows hold them
        "view_frames": {c: frame[rows] for c, rows in views.items()},
        "min_move_mm": None if univ is None else smallest_move(univ, views),
    }


def smallest_move(poses: np.ndarray, views: dict):
    """The smallest, over consecutive rows of each camera, of the largest joint displacement
    between them (mm, all 32 joints); None when no camera has two rows. h36m-fetch keeps a
    training frame only once some joint has moved MOTION_THRESHOLD_MM since the last kept frame,
    so its training trees give at least that."""
    moves = [
        np.linalg.norm(np.diff(poses[rows], axis=0), axis=-1).max(axis=-1).min()
        for rows in views.values()
        if len(rows) > 1
    ]
    return float(min(moves)) if moves else None


# ---------------------------------------------------------------------------------------------
# frame selection: which frames of each video a split holds


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def every_nth(step: int) -> str:
    if step == 1:
        return "every frame"
    return f"every {ordinal(step)} frame (frame numbers 1, {1 + step}, {1 + 2 * step}, ...)"


def regular_step(view_frames: list) -> int:
    """step > 0 when every video's frames are 1, 1 + step, 1 + 2 step, ... without a gap (the
    same step in all); 0 otherwise, or when no video has two frames to tell the step by."""
    steps = set()
    for frames in view_frames:
        if len(frames) == 0 or frames[0] != 1:
            return 0
        gaps = np.diff(frames)
        if len(gaps):
            if (gaps != gaps[0]).any() or gaps[0] <= 0:
                return 0
            steps.add(int(gaps[0]))
    return steps.pop() if len(steps) == 1 else 0


def describe_frames(annotations: list) -> tuple:
    """(step, text) for the frames of one split's sequences (read_annotations' dicts): step > 0
    for a regular selection (regular_step), else 0; text says which selection it is."""
    view_frames = [f for ann in annotations for f in ann["view_frames"].values()]
    step = regular_step(view_frames)
    if step:
        return step, every_nth(step)
    moves = [ann["min_move_mm"] for ann in annotations]
    if moves and all(m is not None and m >= MOTION_THRESHOLD_MM - 1e-6 for m in moves):
        return 0, (
            f"frames kept once some joint had moved at least {MOTION_THRESHOLD_MM:.0f} mm since "
            "the last kept frame (h36m-fetch's selection for training subjects; checked on "
            "pose/3d-univ)"
        )
    return 0, "the frames the tree holds, with irregular gaps (no regular step)"


def select_rows(ann: dict, keep: np.ndarray) -> dict:
    """read_annotations' dict restricted to the rows where keep (bool, one per row) is true."""
    rows = np.flatnonzero(keep)
    out = {
        "pose_2d": ann["pose_2d"][rows],
        "pose_3d": ann["pose_3d"][rows],
        "camera": [ann["camera"][i] for i in rows],
        "frame": ann["frame"][rows],
        "min_move_mm": ann["min_move_mm"],
    }
    out["view_frames"] = {
        c: out["frame"][np.array(out["camera"]) == c] for c in dict.fromkeys(out["camera"])
    }
    return out


def check_test_every(items: list, annotations: dict, every: int, tree_step: int, tree_text: str):
    """DataError unless every test video holds the frames 1, 1 + every, ... up to its last frame:
    the JPEGs of the frames --test-every asks for must be in the tree."""
    for _subject, _action, seq in items:
        for camera, frames in annotations[seq]["view_frames"].items():
            wanted = np.arange(1, int(frames.max()) + 1, every)
            missing = np.setdiff1d(wanted, frames)
            if len(missing):
                fix = (
                    f"choose a multiple of {tree_step}"
                    if tree_step
                    else "convert without --test-every"
                )
                raise DataError(
                    f"--test-every {every}: {seq} camera {camera} has no frame {missing[0]} (the "
                    f"test sequences hold {tree_text}); {fix}, or make h36m-fetch keep more test "
                    f"frames (select_frame_indices_to_include in process_all.py; see {RECIPE})"
                )


def check_test_every_flag(test_every) -> None:
    if test_every is not None and (
        isinstance(test_every, bool) or not isinstance(test_every, int) or test_every < 1
    ):
        raise InputError(f"--test-every must be a whole number >= 1, got {test_every!r}")


def selection_attrs(path) -> dict:
    """The frame selection and crop centring a converted split file states (SELECTION_ATTRS);
    {} for a file without them (synthetic data, files from before the attributes existed)."""
    with h5py.File(path, "r") as f:
        out = {}
        for key in SELECTION_ATTRS:
            if key in f.attrs:
                value = f.attrs[key]
                value = value.decode() if isinstance(value, bytes) else value
                out[key] = value.item() if isinstance(value, np.generic) else value
        return out


def crop_box(joints_2d: np.ndarray, margin: float = 0.2) -> tuple:
    """(x0, y0, side) in whole image pixels: the square around the joints' bounding box, side
    (1 + margin) x its larger extent, centred on it. joints_2d: (J, 2)."""
    lo, hi = joints_2d.min(axis=0), joints_2d.max(axis=0)
    side = max(int(np.ceil((1 + margin) * (hi - lo).max())), 2)
    centre = (lo + hi) / 2
    x0, y0 = (int(np.floor(c - side / 2)) for c in centre)
    return x0, y0, side


def crop_image(image, box: tuple, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image's square box (may leave the image: black padding) resized to size x size RGB."""
    from PIL import Image

    x0, y0, side = box
    crop = image.convert("RGB").crop((x0, y0, x0 + side, y0 + side))  # black outside the image
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def to_crop(joints_2d: np.ndarray, box: tuple, size: int = IMAGE_SIZE) -> np.ndarray:
    """Image pixels (..., 2) -> crop pixels of a box (x0, y0, side) resized to size."""
    x0, y0, side = box
    return (joints_2d - np.array([x0, y0])) * (size / side)


def convert_sequence(seq_dir, annotations: dict, margin: float = 0.2):
    """Yields dicts of at most WRITE_BATCH rows (SplitWriter.append keywords, without subject and
    action) for one sequence."""
    from PIL import Image

    seq_dir = Path(seq_dir)
    n = len(annotations["frame"])
    for start in range(0, n, WRITE_BATCH):
        rows = range(start, min(start + WRITE_BATCH, n))
        images = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        joints_2d = np.empty((len(rows), 17, 2))
        for k, i in enumerate(rows):
            camera, frame = annotations["camera"][i], int(annotations["frame"][i])
            jpeg = seq_dir / "imageSequence" / camera / f"img_{frame:06d}.jpg"
            if not jpeg.is_file():
                raise DataError(
                    f"{jpeg}: frame image missing (row {i} of {seq_dir / 'annot.h5'}, "
                    f"key 'frame' = {frame}, camera {camera})"
                )
            box = crop_box(annotations["pose_2d"][i], margin)
            with Image.open(jpeg) as image:
                images[k] = crop_image(image, box)
            joints_2d[k] = to_crop(annotations["pose_2d"][i], box)
        yield {
            "images": images,
            "joints_3d": annotations["pose_3d"][rows.start : rows.stop],
            "joints_2d": joints_2d,
            "camera": annotations["camera"][rows.start : rows.stop],
            "frame": annotations["frame"][rows.start : rows.stop].astype(np.int32),
        }


def convert(
    root, out_dir, progress=True, margin: float = 0.2, test_every: int | None = None
) -> dict:
    """Converts ROOT into OUT_DIR/train.h5 and OUT_DIR/test.h5.

    test_every N keeps the test rows of frames 1, 1 + N, 1 + 2N, ... (check_test_every refuses an
    N whose frames the tree lacks); None keeps every test row the tree holds.

    Returns {'train': path or None, 'test': path or None, 'n_train', 'n_test', 'skipped_subjects',
    'frame_selection': {split: text}, 'test_every', 'seconds', 'images_per_s'}. test_every is N,
    or without N the tree's own regular test step (0 when the test frames have no regular step).
    A split without any sequence is not written (with a warning).
    Every annot.h5 is read and checked before anything is written; the files are renamed into place
    only after every row of both splits was written, so an error while converting (a missing JPEG,
    a bad annotation, a --test-every the tree cannot give) leaves the previous train.h5 and test.h5
    as they were.
    """
    from tqdm import tqdm

    check_test_every_flag(test_every)
    root, out_dir = Path(root), Path(out_dir)
    sequences = find_sequences(root)
    by_split = {split: [] for split in SPLITS}
    skipped = []
    for subject, action, seq in sequences:
        split = split_of(subject)
        if split is None:
            if subject not in skipped:
                skipped.append(subject)
                warnings.warn(
                    f"{root / subject}: subject {subject!r} is in neither split "
                    f"(train {SPLITS['train']}, test {SPLITS['test']}); skipped"
                )
            continue
        by_split[split].append((subject, action, seq))
    # read (and check) every annotation before writing anything
    annotations = {
        seq: read_annotations(seq / "annot.h5")
        for items in by_split.values()
        for _, _, seq in items
    }
    selection = {
        split: describe_frames([annotations[seq] for _, _, seq in items])
        for split, items in by_split.items()
    }
    tree_step, tree_text = selection["test"]
    if test_every is not None and by_split["test"]:
        check_test_every(by_split["test"], annotations, test_every, tree_step, tree_text)
        for _, _, seq in by_split["test"]:
            keep = (annotations[seq]["frame"] - 1) % test_every == 0
            annotations[seq] = select_rows(annotations[seq], keep)
        selection["test"] = (
            test_every,
            f"{every_nth(test_every)}, chosen with --test-every {test_every} from a tree "
            f"holding {tree_text}",
        )
    test_step = test_every if test_every is not None else tree_step
    t0 = time.perf_counter()
    result = {
        "skipped_subjects": skipped,
        "frame_selection": {split: text for split, (_, text) in selection.items()},
        "test_every": int(test_step),
    }
    total = 0
    writers = {}
    try:
        for split, items in by_split.items():
            if not items:
                warnings.warn(
                    f"{root}: no sequences of the {split} subjects {SPLITS[split]}; "
                    f"{out_dir / (split + '.h5')} not written"
                )
                continue
            n_rows = sum(len(annotations[seq]["frame"]) for _, _, seq in items)
            writers[split] = SplitWriter(
                out_dir / f"{split}.h5",
                source="h36m",
                attrs={
                    "h36m_root": str(root),
                    "crop_margin": margin,
                    "frame_selection": selection[split][1],
                    "test_every": int(test_step),
                    "crop_centred_on": CROP_CENTRED_ON,
                },
            )
            writers[split].open()
            with tqdm(
                total=n_rows, desc=f"h36m {split}.h5", unit="img", disable=not progress
            ) as bar:
                for subject, action, seq in items:
                    for batch in convert_sequence(seq, annotations[seq], margin):
                        b = len(batch["images"])
                        writers[split].append(subject=[subject] * b, action=[action] * b, **batch)
                        bar.update(b)
        # renamed into place only after every row of both splits
        for writer in writers.values():
            writer.close()
            total += writer.n
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if writers:  # size and sha256 of each file, checked by nodes that fetch --data s3://...
        write_manifest(out_dir)
    seconds = time.perf_counter() - t0
    for split in SPLITS:
        result[split] = str(writers[split].path) if split in writers else None
        result[f"n_{split}"] = writers[split].n if split in writers else 0
    result["seconds"] = seconds
    result["images_per_s"] = total / max(seconds, 1e-9)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        required=True,
        help="processed Human3.6M directory (<subject>/<action>-<subaction>/annot.h5)",
    )
    parser.add_argument("--out", default="data/h36m", help="output directory (default: data/h36m)")
    parser.add_argument(
        "--margin",
        type=float,
        default=0.2,
        help="box side = (1 + margin) x the joints' larger extent (default 0.2)",
    )
    parser.add_argument(
        "--test-every",
        type=int,
        metavar="N",
        help="keep the test frames 1, 1 + N, 1 + 2N, ... of each video (default: every test "
        "frame the tree holds; h36m-fetch's tree holds every 64th, so N must be a multiple of 64 "
        "there)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace train.h5 and test.h5 if --out holds them (default: refuse)",
    )


def run(args) -> int:
    # checked before anything is read or written; an existing dataset is replaced only with
    # --force, and then by rename once both splits are complete (convert)
    if not 0 <= args.margin <= 2:
        raise InputError(f"--margin must lie in [0, 2], got {args.margin}")
    check_test_every_flag(args.test_every)
    if Path(args.root).is_file():  # a pose file, an archive, one annot.h5: say what it is
        raise DataError(other_layout(args.root))
    existing_dir(args.root, "--root", "processed Human3.6M folder")
    out = output_dir(args.out, "--out")
    refuse_existing([out / "train.h5", out / "test.h5"], "--out", args.force)
    result = convert(
        args.root,
        args.out,
        progress=not args.no_progress,
        margin=args.margin,
        test_every=args.test_every,
    )
    for split in SPLITS:
        if result[split]:
            print(f"wrote {result[split]} ({result[f'n_{split}']} samples)")
            print(f"  {split} frames: {result['frame_selection'][split]}")
    print(f"crops centred on {CROP_CENTRED_ON}")
    if result["skipped_subjects"]:
        print(f"skipped subjects outside both splits: {' '.join(result['skipped_subjects'])}")
    print(f"{result['images_per_s']:.0f} images/s")
    return 0
