"""`raypose export`: the trained regression network as one file that runs without raypose.

  raypose export MODEL --format onnx|torchscript --out FILE [--force]

MODEL is an experiment URI (its best checkpoint) or a checkpoint URI, local or s3://, checked and
loaded as the evaluation loads one. The file holds raypose.evaluation.regressor.PoseRegressor:
a prepared crop batch float32 (B, 3, 112, 112) in, root-relative joints float32 (B, 17, 3) in mm
out, with the parent-relative offsets summed down the skeleton's tree inside the graph; the
batch size B is free. FILE.json beside it says how to prepare the input (shape, dtype,
normalisation) and names the joints.

- onnx: torch.onnx.export (the torch.export-based exporter, one self-contained file). Needs the
  onnx and onnxscript packages, the `export` extra (pip install 'raypose[export]'). The file
  runs under onnxruntime and `raypose predict FILE.onnx` runs it.
- torchscript: torch.jit.trace, loaded with torch.jit.load (torch alone, no raypose). PyTorch
  marks TorchScript as deprecated; it still loads where a Python environment has torch.

An existing FILE or FILE.json is refused unless --force; both are written beside their place and
renamed into it, so a failed export leaves what was there.
"""

import importlib.util
import inspect
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from raypose import storage, validate
from raypose.evaluation.regressor import input_spec, load_regressor
from raypose.model.network import INPUT_SIZE

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}
# the packages torch.onnx.export needs for --format onnx (the `export` extra)
ONNX_EXPORT_PACKAGES = ("onnx", "onnxscript")
# the batch the graph is traced with: any size above 1 (torch.export takes a size of 1 for a
# constant); the exported graph takes every batch size
EXAMPLE_BATCH = 2


class ExportError(ValueError):
    """Bad input to `raypose export`: the message names the flag or the model."""


def sidecar_path(out: Path) -> Path:
    """The JSON beside an exported file: FILE.json (model.onnx -> model.onnx.json)."""
    return out.with_name(out.name + ".json")


def installed(package: str) -> bool:
    """Whether package can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules holds None for it: imports of it are refused
        return False


def check_inputs(model: str, fmt: str, out_file: str, force: bool) -> Path:
    """Every check that needs no checkpoint, before any download: the format and what it needs,
    the output file and its JSON, and the model's URI."""
    if fmt not in FORMATS:
        raise ExportError(
            f"--format {validate.shown(fmt)} is not known; use one of {', '.join(FORMATS)}"
        )
    if fmt == "onnx":
        wanted = {"dynamo", "dynamic_shapes", "external_data"}
        if not wanted <= set(inspect.signature(torch.onnx.export).parameters):
            raise ExportError(
                f"--format onnx needs the torch.export-based ONNX exporter, which torch "
                f"{torch.__version__} lacks (raypose exports with torch 2.13); upgrade torch"
            )
        missing = [m for m in ONNX_EXPORT_PACKAGES if not installed(m)]
        if missing:
            raise ExportError(
                f"--format onnx needs the {' and '.join(missing)} package"
                f"{'s' if len(missing) > 1 else ''}: pip install 'raypose[export]'"
            )
    out = validate.output_file(out_file, "--out", force, FORMATS[fmt])
    validate.refuse_existing([sidecar_path(out)], "--out", force)
    if model.lower().endswith(".onnx"):
        raise ExportError(f"MODEL {model}: already an exported model; export a checkpoint")
    try:
        loc = storage.parse(model)
    except storage.StorageError as e:
        raise ExportError(f"MODEL: {e}") from None
    if loc.scheme == "s3":
        storage.check_reachable(loc, create=False)
    return out


def export_onnx(regressor: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    # the exporter logs that torchvision's operators are skipped (raypose has none) and passes
    # on torch-internal deprecation notices: neither concerns this graph
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                regressor,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["joints_3d"],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,  # the weights inside the one file
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)


def export_torchscript(regressor: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # from_parent_relative's shape assert is a constant of the fixed skeleton, which the
        # tracer warns about; and torch.jit's own notice that TorchScript is deprecated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(regressor, (example,))
        traced.save(str(path))


def shareable(path: Path) -> None:
    """The permissions of an ordinary new file (0666 less the umask): the temporary file that
    replace_atomically renames into place is made readable by its owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export(model: str, fmt: str, out_file: str, force: bool = False) -> dict:
    """Writes the regression network of MODEL to out_file and its JSON beside it; returns the JSON."""
    out = check_inputs(model, fmt, out_file, force)
    regressor, source = load_regressor(model, torch.device("cpu"), "raypose export")
    example = torch.zeros(EXAMPLE_BATCH, 3, INPUT_SIZE, INPUT_SIZE)
    with validate.replace_atomically(out) as tmp:
        with torch.no_grad():
            (export_onnx if fmt == "onnx" else export_torchscript)(regressor, example, tmp)
        size = tmp.stat().st_size
        spec = {"format": fmt, "file": out.name, "source": source, **input_spec()}
        with validate.replace_atomically(sidecar_path(out)) as tmp_json:
            tmp_json.write_text(json.dumps(spec, indent=1))
            shareable(tmp_json)
        shareable(tmp)
    print(
        f"[raypose] exported the regression network of {source['checkpoint']} (epoch "
        f"{source['epoch']}) as {fmt}: {out.resolve()} ({size / 1e6:.1f} MB); input and joint "
        f"names: {sidecar_path(out).resolve()}",
        flush=True,
    )
    return spec


# ----------------------------------------------------------------------------------------------
# Command line: raypose export


def add_arguments(parser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="experiment URI (its best checkpoint) or checkpoint URI (a folder or s3://...)",
    )
    parser.add_argument(
        "--format",
        required=True,
        help=f"{' or '.join(FORMATS)} (onnx needs the `export` extra)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the file to write (.onnx; .pt or .pth for torchscript); FILE.json goes beside it",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace FILE and FILE.json if they exist"
    )


def run(args) -> int:
    export(args.model, args.format, args.out, args.force)
    return 0
