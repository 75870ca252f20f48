"""The trained regression network on its own, as `raypose predict` runs it and `raypose export`
writes it: prepared crops in, root-relative joints in mm out.

PoseRegressor keeps the conv trunk and the regression head of a LiChanNet and adds what the
evaluation does after the network (raypose.train.loop.predict): the tanh outputs times
OFFSET_SCALE_MM are the parent-relative offsets, summed down the skeleton's tree
(raypose.data.skeleton.from_parent_relative). The same operations in the same order, so its
joints equal the evaluation's for the same input.

  input   float32 (B, 3, 112, 112)  a prepared crop batch (raypose.data.dataset.prepare_test_images)
  output  float32 (B, 17, 3)        root-relative joints, mm, camera coordinates, H36M_SKELETON order

`input_spec` describes both for the JSON written beside an export.
"""

import tempfile
from pathlib import Path

import torch

from raypose import __version__
from raypose.data.dataset import (
    CENTRE_OFFSET,
    CROP_SIZE,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
)
from raypose.data.skeleton import H36M_SKELETON, OFFSET_SCALE_MM, from_parent_relative
from raypose.evaluation.evaluate import load_model
from raypose.model.network import NUM_JOINTS, LiChanNet
from raypose.storage import checkpoint, download_dir
from raypose.storage.experiment import EvaluationError, resolve


class PoseRegressor(torch.nn.Module):
    """A LiChanNet's trunk and regression head; forward: (B, 3, 112, 112) -> (B, 17, 3) mm."""

    def __init__(self, network: LiChanNet):
        super().__init__()
        if network.regression is None:
            raise ValueError("the network has no regression head")
        self.trunk = network.trunk
        self.regression = network.regression

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)  # (B, 6400)
        offsets = torch.tanh(self.regression(features)).view(-1, NUM_JOINTS, 3)  # scaled, tanh
        return from_parent_relative(offsets.float() * OFFSET_SCALE_MM)  # (B, 17, 3) mm


def no_regression_head(uri: str, command: str) -> checkpoint.CheckpointError:
    return checkpoint.CheckpointError(
        f"checkpoint {uri} has no regression head (the detection stage of a pretrain trial); "
        f"{command} needs a checkpoint from the regression stage or from a joint trial"
    )


def load_regressor(uri: str, device: torch.device, command: str) -> tuple:
    """(PoseRegressor in eval mode on device, facts about its checkpoint) for an experiment URI
    (its best checkpoint) or a checkpoint URI, local or s3://. The checkpoint is checked as the
    evaluation checks it (raypose.evaluation.evaluate.load_model: manifest, config, then the
    weights with weights_only=True); one without a regression head is refused."""
    target = resolve(uri)
    ckpt_loc = target["checkpoint"]
    if ckpt_loc is None:  # an experiment of several results, e.g. a grid sweep's
        raise EvaluationError(
            f"{uri} names no single checkpoint ({target['kind']}); pass one of its checkpoints"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(ckpt_loc, Path(tmp) / "checkpoint")
        try:
            network, _, loaded = load_model(local, device)
        except checkpoint.CheckpointError as e:  # name the checkpoint in storage, not the copy
            raise checkpoint.CheckpointError(str(e).replace(str(local), ckpt_loc.uri)) from None
    if network.regression is None:
        raise no_regression_head(ckpt_loc.uri, command)
    facts = {
        "kind": target["kind"],
        "checkpoint": ckpt_loc.uri,
        "experiment": target["experiment"].uri if target["experiment"] else None,
        "epoch": loaded["state"]["epoch"],
        "stage": loaded["state"]["stage"],
        "config_sha256": loaded["manifest"]["config_sha256"],
    }
    return PoseRegressor(network).to(device).eval(), facts


def input_spec() -> dict:
    """What a caller of an exported model must feed it and gets back (the JSON beside an export)."""
    return {
        "input": {
            "name": "images",
            "shape": ["batch", 3, CROP_SIZE, CROP_SIZE],
            "dtype": "float32",
            "layout": "NCHW, RGB channels",
            "box_size": IMAGE_SIZE,
            "crop": {"offset": CENTRE_OFFSET, "size": CROP_SIZE},
            "preparation": [
                f"the person crop as a square {IMAGE_SIZE} x {IMAGE_SIZE} RGB box: the square "
                "centred on the crop with its longer side, black where it leaves the crop, "
                "resized with Pillow's bilinear filter",
                f"its centre {CROP_SIZE} x {CROP_SIZE} crop: pixels {CENTRE_OFFSET} to "
                f"{CENTRE_OFFSET + CROP_SIZE - 1} on both axes",
                "(pixel / 255 - mean) / std per channel",
            ],
            "normalisation": {
                "scale": "1/255",
                # as written in raypose.data.dataset (each the same number as a float32)
                "mean": [round(float(v), 6) for v in IMAGE_MEAN],
                "std": [round(float(v), 6) for v in IMAGE_STD],
            },
        },
        "output": {
            "name": "joints_3d",
            "shape": ["batch", NUM_JOINTS, 3],
            "dtype": "float32",
            "units": "mm",
            "frame": "camera coordinates (x right, y down, z forward), root-relative: "
            f"joint 0 ({H36M_SKELETON.names[0]}) at 0",
        },
        "joint_names": list(H36M_SKELETON.names),
        "joint_parents": list(H36M_SKELETON.parents),
        "raypose_version": __version__,
    }
