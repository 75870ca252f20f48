"""The two task losses of PAPER.md and their combinations for the joint and pretrain schedules."""

import torch
import torch.nn.functional as F


def regression_loss(offsets: torch.Tensor, target_offsets: torch.Tensor) -> torch.Tensor:
    """E_r: squared L2 per joint on scaled parent-relative offsets, summed over joints and
    coordinates, averaged over the batch.  offsets, target_offsets: (B, J, 3)."""
    assert offsets.shape == target_offsets.shape, (offsets.shape, target_offsets.shape)
    return (offsets - target_offsets).pow(2).sum(dim=(1, 2)).mean()


def detection_loss(logits: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
    """E_d: binary cross-entropy per (joint, window), summed over joints and windows, averaged
    over the batch.  logits, indicators: (B, J, L).  BCE-with-logits is the stable form of
    sigmoid + BCE."""
    assert logits.shape == indicators.shape, (logits.shape, indicators.shape)
    bce = F.binary_cross_entropy_with_logits(logits.float(), indicators.float(), reduction="none")
    return bce.sum(dim=(1, 2)).mean()


def multitask_loss(outputs: dict, batch: dict, lam: float, stage: str = "joint") -> tuple:
    """The cost optimised in each stage, and its parts for logging.

    stage 'joint':      E_r + lam * E_d (lam = 1 is the paper's 1/2 : 1/2 weighting)
    stage 'detection':  E_d only (pretrain stage 1)
    stage 'regression': E_r only (pretrain stage 2, fresh regression head)
    Returns (loss, {'regression': float|None, 'detection': float|None}).
    """
    parts = {"regression": None, "detection": None}
    e_r = e_d = None
    if stage in ("joint", "regression"):
        e_r = regression_loss(outputs["offsets"].float(), batch["offsets"])
        parts["regression"] = e_r.detach()
    if stage in ("joint", "detection"):
        e_d = detection_loss(outputs["detection_logits"], batch["detection"])
        parts["detection"] = e_d.detach()
    if stage == "joint":
        loss = e_r + lam * e_d
    elif stage == "detection":
        loss = e_d
    elif stage == "regression":
        loss = e_r
    else:
        raise ValueError(
            f"unknown training stage {stage!r}; expected joint, detection or regression"
        )
    return loss, parts
