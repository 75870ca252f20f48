"""`raypose data h36m`: convert a processed Human3.6M tree into raypose's HDF5 splits.

Input (the layout of public download tools such as h36m-fetch):

    ROOT/<subject>/<action>-<subaction>/annot.h5
        pose/2d (N, 32, 2)  pixel coordinates in the camera image
        pose/3d (N, 32, 3)  camera coordinates, mm
        camera (N,)         camera id (int or str), e.g. 54138969
        frame (N,)          frame number, which names the JPEG
        subject (N,), action (N,)
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
"""

import argparse
import time
import warnings
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


def split_of(subject: str):
    for split, subjects in SPLITS.items():
        if subject in subjects:
            return split
    return None


def find_sequences(root) -> list:
    """Sorted (subject, action, sequence dir) for every ROOT/<subject>/<action>-<subaction>/annot.h5."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: Human3.6M root not found (expected a directory with "
            f"<subject>/<action>-<subaction>/annot.h5)"
        )
    sequences = []
    for annot in sorted(root.glob("*/*/annot.h5")):
        seq = annot.parent
        action = seq.name.rsplit("-", 1)[0] if "-" in seq.name else seq.name
        sequences.append((seq.parent.name, action, seq))
    if not sequences:
        raise DataError(
            f"{root}: no sequences found (expected <subject>/<action>-<subaction>/annot.h5, "
            f"e.g. S1/Walking-1/annot.h5)"
        )
    return sequences


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
    cameras = [c.decode() if isinstance(c, bytes) else str(c) for c in camera.tolist()]
    return {
        "pose_2d": pose_2d[:, H36M_17_OF_32],
        "pose_3d": pose_3d[:, H36M_17_OF_32],
        "camera": cameras,
        "frame": frame.astype(np.int64),
    }


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


def convert(root, out_dir, progress=True, margin: float = 0.2) -> dict:
    """Converts ROOT into OUT_DIR/train.h5 and OUT_DIR/test.h5.

    Returns {'train': path or None, 'test': path or None, 'n_train', 'n_test', 'skipped_subjects',
    'seconds', 'images_per_s'}. A split without any sequence is not written (with a warning).
    Every annot.h5 is read and checked before anything is written; the files are renamed into place
    only after every row of both splits was written, so an error while converting (a missing JPEG,
    a bad annotation) leaves the previous train.h5 and test.h5 as they were.
    """
    from tqdm import tqdm

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
    t0 = time.perf_counter()
    result = {"skipped_subjects": skipped}
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
            writers[split] = SplitWriter(
                out_dir / f"{split}.h5",
                source="h36m",
                attrs={"h36m_root": str(root), "crop_margin": margin},
            )
            writers[split].open()
            n_rows = sum(len(annotations[seq]["frame"]) for _, _, seq in items)
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
    existing_dir(args.root, "--root", "processed Human3.6M folder")
    out = output_dir(args.out, "--out")
    refuse_existing([out / "train.h5", out / "test.h5"], "--out", args.force)
    result = convert(args.root, args.out, progress=not args.no_progress, margin=args.margin)
    for split in SPLITS:
        if result[split]:
            print(f"wrote {result[split]} ({result[f'n_{split}']} samples)")
    if result["skipped_subjects"]:
        print(f"skipped subjects outside both splits: {' '.join(result['skipped_subjects'])}")
    print(f"{result['images_per_s']:.0f} images/s")
    return 0
