"""`raypose predict`: run a trained model on person crops and write the 3D joints it sees.

  raypose predict MODEL IMAGE... --out DIR [--batch-size N] [--gpu] [--figures N] [--force]
  raypose predict MODEL --data FILE.h5 --out DIR ...

MODEL is an experiment URI (its best checkpoint, as best.json names it), a checkpoint URI (a
local folder or s3://...), or an .onnx file that `raypose export` wrote (run with onnxruntime,
which raypose does not install: the `test` extra has it). A checkpoint is checked and loaded as the
evaluation loads one (raypose.evaluation.regressor).

Each IMAGE (any format Pillow reads) is prepared as the evaluation prepares a test sample
(raypose.data.dataset, "Preparing a test sample": the 128 box, its centre 112 crop, the
normalisation). --data takes an HDF5 file instead: a raypose split file (test.h5) is read by the
evaluation's own reading code and has ground truth, so each entry also gets its error; an HDF5
file with only an 'images' dataset (N, 128, 128, 3) uint8 is read as boxes without ground truth.

Outputs in DIR: predictions.json (per input its name, `joints_3d` 17 x 3 root-relative mm in
the skeleton's joint order, the joint names once at the top) and per input a PNG of the crop
beside the predicted skeleton from two views. An --out that holds earlier predictions is
refused unless --force; the files are written beside DIR and moved in at the end.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from raypose import storage, validate
from raypose.data.dataset import (
    IMAGE_SIZE,
    PoseDataset,
    augment_batch,
    batch_chunks,
    box_image,
    centre_crop,
    host_batches,
    prepare_test_images,
    to_device,
)
from raypose.data.schema import DataError
from raypose.data.skeleton import H36M_SKELETON
from raypose.evaluation import figures
from raypose.evaluation.regressor import load_regressor
from raypose.model.metrics import per_joint_error
from raypose.model.network import INPUT_SIZE, NUM_JOINTS
from raypose.storage.experiment import ledger_location, record_test_read

PREDICTIONS_FILE = "predictions.json"
DATA_FIGURES = 8  # PNGs drawn by default for --data (the first samples): a test split has thousands


class PredictError(ValueError):
    """Bad input to `raypose predict`: the message names the flag, the file or the model."""


# ----------------------------------------------------------------------------------------------
# the model: a checkpoint (torch) or an exported .onnx file (onnxruntime)


def model_kind(model: str) -> str:
    """'onnx' for an .onnx file, else 'checkpoint' (an experiment or a checkpoint URI). A
    malformed URI or a local file of another kind: PredictError naming MODEL."""
    if model.lower().endswith(".onnx"):
        if "://" in model:
            raise PredictError(
                f"MODEL {validate.clipped(model)}: an .onnx model must be a local file"
            )
        validate.existing_file(model, "MODEL", "ONNX file")
        return "onnx"
    if "://" not in model and Path(model).is_file():
        raise PredictError(
            f"MODEL {model}: a file; expected an experiment or checkpoint (a folder, or "
            "s3://...) or an .onnx file from `raypose export`"
        )
    try:
        loc = storage.parse(model)
    except storage.StorageError as e:
        raise PredictError(f"MODEL: {e}") from None
    if loc.scheme == "s3":
        storage.check_reachable(loc, create=False)
    return "checkpoint"


class TorchRunner:
    """A PoseRegressor on its device: prepared crops (B, 3, 112, 112) -> joints (B, 17, 3) mm."""

    def __init__(self, regressor: torch.nn.Module):
        self.regressor = regressor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.regressor(images).cpu().numpy()


class OnnxRunner:
    """An exported model in an onnxruntime session, called as TorchRunner is."""

    def __init__(self, path: str, use_gpu: bool):
        try:
            import onnxruntime  # optional: only an .onnx MODEL needs it
        except ImportError:
            raise PredictError(
                f"MODEL {path}: running an .onnx model needs onnxruntime, which raypose does "
                "not install; pip install onnxruntime (or the `test` extra, raypose[test])"
            ) from None
        providers = ["CPUExecutionProvider"]
        if use_gpu:
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise PredictError(
                    "--gpu was given but this onnxruntime has no CUDA provider "
                    "(install onnxruntime-gpu), or drop --gpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers)
        except Exception as e:  # onnxruntime raises its own kinds for a file that is not ONNX
            raise PredictError(
                f"MODEL {path}: not an ONNX model that onnxruntime can load "
                f"({type(e).__name__}: {validate.clipped(e, 160)})"
            ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want_in = ["batch", 3, INPUT_SIZE, INPUT_SIZE]
        want_out = ["batch", NUM_JOINTS, 3]
        if (
            len(inputs) != 1
            or len(outputs) != 1
            or inputs[0].type != "tensor(float)"
            or list(inputs[0].shape[1:]) != want_in[1:]
            or list(outputs[0].shape[1:]) != want_out[1:]
        ):
            shapes = [list(i.shape) for i in inputs] + ["->"] + [list(o.shape) for o in outputs]
            raise PredictError(
                f"MODEL {path}: takes and returns {shapes}; expected one float32 input "
                f"{want_in} and one output {want_out} (a model that `raypose export` wrote)"
            )
        self.input_name = inputs[0].name

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.cpu().numpy()})[0]


# ----------------------------------------------------------------------------------------------
# the inputs: image files, or an HDF5 file


def check_image(path) -> Path:
    """An IMAGE that exists and that Pillow recognises (decoded later, batch by batch)."""
    from PIL import Image, UnidentifiedImageError

    p = validate.existing_file(path, "IMAGE", "image file")
    try:
        with Image.open(p) as image:
            image.verify()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise PredictError(
            f"IMAGE {path}: not an image that Pillow can read ({type(e).__name__})"
        ) from None
    return p


def read_box(path: Path) -> np.ndarray:
    """An image file as the 128 box of a test sample (raypose.data.dataset.box_image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return box_image(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(
            f"IMAGE {path}: cannot be decoded ({type(e).__name__}: {validate.clipped(e)})"
        ) from None


def figure_names(stems) -> list:
    """<stem>.png per input; a stem seen before gets -2, -3 ... so that no figure overwrites another."""
    seen, names = {}, []
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


class ImageFiles:
    """IMAGE arguments: no ground truth."""

    has_truth = False

    def __init__(self, paths):
        self.paths = [check_image(p) for p in paths]
        self.names = figure_names(p.stem for p in self.paths)

    def __len__(self):
        return len(self.paths)

    def entry(self, i: int) -> dict:
        return {"image": self.paths[i].name, "path": str(self.paths[i])}

    def batches(self, batch_size: int, device: torch.device):
        """(prepared images on device, uint8 boxes, ground truth or None) per batch."""
        for chunk in batch_chunks(np.arange(len(self)), batch_size):
            boxes = np.stack([read_box(self.paths[i]) for i in chunk])
            images = torch.from_numpy(boxes).to(device)
            yield prepare_test_images(images), boxes, None


class SplitFile:
    """--data: a raypose split file, read as the evaluation reads its test split (host_batches,
    then augment_batch without augmentation); its root-relative joints are the ground truth."""

    has_truth = True

    def __init__(self, path: Path):
        self.path = path
        self.dataset = PoseDataset(str(path), augment=False)
        self.names = [f"row-{int(r):06d}.png" for r in self.dataset.indices]

    def __len__(self):
        return len(self.dataset)

    def entry(self, i: int) -> dict:
        d = self.dataset
        return {
            "image": self.path.name,
            "row": int(d.indices[i]),
            "subject": d.subjects[d.sample_subjects[i]],
            "action": d.action_names[d.sample_actions[i]],
        }

    def batches(self, batch_size: int, device: torch.device):
        chunks = batch_chunks(np.arange(len(self)), batch_size)
        for raw in host_batches(self.dataset, chunks, 0, pin_memory=device.type == "cuda"):
            batch = augment_batch(to_device(raw, device), self.dataset.augmentation)
            yield batch["image"], raw["images"].numpy(), batch["joints_3d"].cpu().numpy()


class ImageArray:
    """--data: an HDF5 file of boxes, 'images' (N, 128, 128, 3) uint8, without poses."""

    has_truth = False

    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n
        self.names = [f"row-{r:06d}.png" for r in range(n)]

    def __len__(self):
        return self.n

    def entry(self, i: int) -> dict:
        return {"image": self.path.name, "row": i}

    def batches(self, batch_size: int, device: torch.device):
        with h5py.File(self.path, "r") as f:
            for chunk in batch_chunks(np.arange(self.n), batch_size):
                boxes = f["images"][int(chunk[0]) : int(chunk[-1]) + 1]
                yield prepare_test_images(torch.from_numpy(boxes).to(device)), boxes, None


def open_data(path) -> "SplitFile | ImageArray":
    """--data: a split file (it has 'joints_3d': every schema check applies) or an images-only
    HDF5 file; DataError naming the file and the key otherwise."""
    p = validate.existing_file(path, "--data", "HDF5 file")
    if not h5py.is_hdf5(p):
        raise DataError(f"--data {path}: not an HDF5 file")
    with h5py.File(p, "r") as f:
        has_poses = "joints_3d" in f
        images = f.get("images")
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
    if has_poses:
        return SplitFile(p)  # PoseDataset runs the schema's checks
    expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != expected or dtype != np.uint8:
        raise DataError(
            f"--data {path}: key 'images': expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) uint8, "
            + ("the file has no such key" if shape is None else f"got {shape} {dtype}")
            + " (a raypose split file, or an HDF5 file of 128 x 128 RGB boxes)"
        )
    if shape[0] == 0:
        raise DataError(f"--data {path}: key 'images' holds no rows")
    return ImageArray(p, int(shape[0]))


# ----------------------------------------------------------------------------------------------
# the command


def earlier_outputs(out: Path) -> list:
    """The files an earlier run wrote into out (its predictions.json and the figures it lists)."""
    try:
        earlier = json.loads((out / PREDICTIONS_FILE).read_text())
        named = [e.get("figure") for e in earlier.get("predictions", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        named = []
    return [PREDICTIONS_FILE, *(n for n in named if isinstance(n, str) and "/" not in n)]


def check_inputs(model, image_paths, data_path, out_dir, batch_size, use_gpu, figures_max, force):
    """Every check that needs no model, before any download: (model kind, inputs, the figures'
    names, --out)."""
    validate.positive(batch_size, "--batch-size")
    if figures_max is not None and figures_max < 0:
        raise PredictError(f"--figures must be >= 0, got {figures_max}")
    if bool(image_paths) == (data_path is not None):
        raise PredictError(
            "give either IMAGE files or --data FILE.h5 (not both, not neither)"
            if image_paths
            else "no input: give IMAGE files or --data FILE.h5"
        )
    if use_gpu and not torch.cuda.is_available():
        raise PredictError("--gpu was given but no CUDA device is visible; drop --gpu")
    kind = model_kind(model)
    inputs = ImageFiles(image_paths) if image_paths else open_data(data_path)
    if figures_max is None:
        figures_max = len(inputs) if image_paths else DATA_FIGURES
    names = inputs.names[: min(figures_max, len(inputs))]
    out = validate.output_dir(out_dir, "--out")
    clash = [n for n in (PREDICTIONS_FILE, *names) if (out / n).exists()]
    if clash and not force:  # earlier predictions are never overwritten silently
        raise PredictError(
            f"--out {out}: {out / clash[0]} already exists (earlier predictions); pass another "
            "--out, or --force to replace them (nothing was written)"
        )
    return kind, inputs, names, out


def predicted_entries(run, inputs, names, batch_size, device, figure_dir: Path) -> list:
    """predictions.json's entries, one per input, in order; the first len(names) inputs' figures
    drawn into figure_dir."""
    entries = []
    for images, boxes, truth in inputs.batches(batch_size, device):
        joints = run(images).astype(np.float32)  # (B, 17, 3) mm
        if truth is not None:
            mpjpe = per_joint_error(joints, truth).mean(axis=1)  # (B,) mm
            p_mpjpe = per_joint_error(joints, truth, "procrustes").mean(axis=1)
        for k in range(len(joints)):
            at = len(entries)
            entry = {**inputs.entry(at), "joints_3d": joints[k].tolist()}
            if truth is not None:
                entry["mpjpe_mm"] = float(mpjpe[k])
                entry["p_mpjpe_mm"] = float(p_mpjpe[k])
            entry["figure"] = names[at] if at < len(names) else None
            if entry["figure"]:
                title = entry["image"] + (f" row {entry['row']}" if "row" in entry else "")
                if truth is not None:
                    title += f": MPJPE {entry['mpjpe_mm']:.1f} mm"
                figures.prediction_figure(
                    centre_crop(boxes[k : k + 1])[0],
                    joints[k],
                    figure_dir / entry["figure"],
                    title=title,
                    gt=None if truth is None else truth[k],
                )
            entries.append(entry)
    return entries


def record_labelled_read(source: dict, data_path: str, samples: int) -> int:
    """Add this read of a labelled split to the checkpoint's experiment ledger; the count."""
    ckpt = storage.parse(source["checkpoint"])
    experiment = storage.parse(source["experiment"]) if source.get("experiment") else None
    ledger = ledger_location(ckpt, experiment)
    count = record_test_read(
        ledger,
        {
            "checkpoint": ckpt.uri,
            "data": str(Path(data_path).resolve()),
            "test_sha256": storage.sha256_file(Path(data_path)),
            "test_samples": samples,
            "command": "raypose predict --data",
        },
    )
    print(
        f"[raypose] {data_path} has ground truth: this read is recorded in {ledger.uri} "
        f"({count} read(s) there)",
        flush=True,
    )
    return count


def predict(
    model: str,
    image_paths=(),
    data_path: str | None = None,
    *,
    out_dir: str,
    batch_size: int = 64,
    use_gpu: bool = False,
    figures_max: int | None = None,
    force: bool = False,
) -> dict:
    """Runs MODEL on the inputs and writes predictions.json and the figures into out_dir; returns
    what predictions.json holds. figures_max: PNGs of the first this many inputs (None: every
    image file, the first DATA_FIGURES samples of data_path)."""
    kind, inputs, names, out = check_inputs(
        model, image_paths, data_path, out_dir, batch_size, use_gpu, figures_max, force
    )
    device = torch.device("cuda" if use_gpu else "cpu")
    if kind == "onnx":
        run = OnnxRunner(model, use_gpu)
        source = {"kind": "onnx", "onnx": str(Path(model).resolve())}
    else:
        regressor, source = load_regressor(model, device, "raypose predict")
        run = TorchRunner(regressor)
    where = device.type + (", onnxruntime" if kind == "onnx" else "")
    print(f"[raypose] predicting {len(inputs)} inputs with {model} ({where})", flush=True)
    # written into a folder beside --out and moved in at the end: a failed run leaves --out as it
    # was, and --force removes the earlier run's figures that this one does not draw
    with validate.staged_folder(out, earlier_outputs(out) if force else ()) as stage:
        entries = predicted_entries(run, inputs, names, batch_size, device, stage)
        if inputs.has_truth and kind == "checkpoint":
            # a labelled split scored by a checkpoint of an experiment: a read the experiment's
            # test-split ledger keeps, as the evaluation's reads are (docs/evaluation.md)
            record_labelled_read(source, data_path, len(entries))
        errors = [e["mpjpe_mm"] for e in entries if "mpjpe_mm" in e]
        result = {
            "model": model,
            "source": source,
            "units": "mm",
            "coordinates": "camera coordinates (x right, y down, z forward), root-relative: "
            f"joint 0 ({H36M_SKELETON.names[0]}) at 0",
            "joint_names": list(H36M_SKELETON.names),
            "preparation": "raypose.data.dataset: the 128 x 128 box, its centre 112 x 112 crop, "
            "(pixel / 255 - mean) / std",
            "mean_mpjpe_mm": float(np.mean(errors)) if errors else None,
            "predictions": entries,
        }
        (stage / PREDICTIONS_FILE).write_text(json.dumps(result, indent=1))
    drawn = sum(e["figure"] is not None for e in entries)
    error_text = f", MPJPE {result['mean_mpjpe_mm']:.1f} mm over them" if errors else ""
    print(
        f"[raypose] predictions: {len(entries)}{error_text}; figures: {drawn}; "
        f"{out.resolve() / PREDICTIONS_FILE}",
        flush=True,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Command line: raypose predict


def add_arguments(parser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="experiment URI (its best checkpoint), checkpoint URI (a folder or s3://...), "
        "or an .onnx file from `raypose export`",
    )
    parser.add_argument(
        "images", metavar="IMAGE", nargs="*", help="person crops, any format Pillow reads"
    )
    parser.add_argument(
        "--data",
        metavar="FILE.h5",
        help="an HDF5 file instead of IMAGEs: a raypose split file such as test.h5 (each entry "
        "also gets its error) or a file of 'images' (N, 128, 128, 3) uint8",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu", action="store_true", help="run on the GPU")
    parser.add_argument(
        "--figures",
        type=int,
        metavar="N",
        help=f"draw PNGs of the first N inputs (default: every IMAGE, the first {DATA_FIGURES} "
        "samples of --data); 0 draws none",
    )
    parser.add_argument("--force", action="store_true", help="replace earlier predictions in --out")


def run(args) -> int:
    predict(
        args.model,
        args.images,
        args.data,
        out_dir=args.out,
        batch_size=args.batch_size,
        use_gpu=args.gpu,
        figures_max=args.figures,
        force=args.force,
    )
    return 0
