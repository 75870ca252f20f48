"""E_r, E_d and the per-stage costs, with hand-computed values on tiny tensors."""

import math

import pytest
import torch
import torch.nn as nn

from raypose.model.losses import detection_loss, multitask_loss, regression_loss


def test_regression_loss_hand_computed():
    # sample 0: (0.1, 0.2, 0.3) vs 0 -> 0.01 + 0.04 + 0.09 = 0.14
    # sample 1: (1, 0, 0) vs (0, 0, -1) -> 1 + 0 + 1 = 2;   mean over the batch = 1.07
    offsets = torch.tensor([[[0.1, 0.2, 0.3]], [[1.0, 0.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 0.0, -1.0]]], dtype=torch.float64)
    assert regression_loss(offsets, target).item() == pytest.approx(1.07, abs=1e-12)


def test_regression_loss_sums_over_joints():
    # two joints, each off by 0.5 in one coordinate: 0.25 + 0.25
    offsets = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.0, -0.5]]])
    assert regression_loss(offsets, torch.zeros_like(offsets)).item() == pytest.approx(0.5)


def test_regression_loss_rejects_shape_mismatch():
    with pytest.raises(AssertionError):
        regression_loss(torch.zeros(2, 17, 3), torch.zeros(2, 16, 3))


def test_detection_loss_hand_computed():
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4
    # sample 0: logits (0, ln3), indicators (1, 1): ln 2 + ln(4/3)
    # sample 1: logits (ln3, -ln3), indicators (0, 0): -ln(1/4) - ln(3/4) = ln 4 + ln(4/3)
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3]], [[ln3, -ln3]]], dtype=torch.float64)
    indicators = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]], dtype=torch.float64)
    expected = (math.log(2) + math.log(4 / 3) + math.log(4) + math.log(4 / 3)) / 2
    assert detection_loss(logits, indicators).item() == pytest.approx(expected, abs=1e-6)


def test_detection_loss_all_zero_logits_is_ln2_per_window():
    logits = torch.zeros(3, 17, 100)
    indicators = (torch.arange(3 * 17 * 100).view(3, 17, 100) % 7 == 0).float()
    assert detection_loss(logits, indicators).item() == pytest.approx(1700 * math.log(2), rel=1e-6)


def test_detection_loss_takes_bool_indicators_and_half_logits():
    logits = torch.zeros(1, 1, 2, dtype=torch.bfloat16)
    indicators = torch.tensor([[[True, False]]])
    loss = detection_loss(logits, indicators)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)


class TwoHeads(nn.Module):
    """A stand-in for LiChanNet with the same output dict: shared trunk, two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.regression = nn.Linear(5, 2 * 3)
        self.detection = nn.Linear(5, 2 * 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {
            "offsets": torch.tanh(self.regression(h)).view(-1, 2, 3),
            "detection_logits": self.detection(h).view(-1, 2, 4),
        }


def _batch():
    torch.manual_seed(1)
    return {
        "image": torch.randn(3, 4),
        "offsets": torch.rand(3, 2, 3) - 0.5,
        "detection": (torch.rand(3, 2, 4) > 0.5).float(),
    }


def test_joint_loss_is_regression_plus_lambda_detection():
    model, batch = TwoHeads(), _batch()
    out = model(batch["image"])
    e_r = regression_loss(out["offsets"], batch["offsets"])
    e_d = detection_loss(out["detection_logits"], batch["detection"])
    for lam in (0.0, 1.0, 2.5):
        loss, parts = multitask_loss(out, batch, lam, "joint")
        torch.testing.assert_close(loss, e_r + lam * e_d)
        torch.testing.assert_close(parts["regression"], e_r.detach())
        torch.testing.assert_close(parts["detection"], e_d.detach())
        assert not parts["regression"].requires_grad


def test_joint_loss_is_the_default_stage_and_reaches_both_heads():
    model, batch = TwoHeads(), _batch()
    loss, _ = multitask_loss(model(batch["image"]), batch, 0.5)
    loss.backward()
    for module in (model.trunk, model.regression, model.detection):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_detection_stage_has_no_regression_part_and_no_regression_gradient():
    model, batch = TwoHeads(), _batch()
    out = model(batch["image"])
    loss, parts = multitask_loss(out, batch, lam=3.0, stage="detection")
    assert parts["regression"] is None
    # E_d alone: lambda does not scale the only term of a stage
    torch.testing.assert_close(loss, detection_loss(out["detection_logits"], batch["detection"]))
    loss.backward()
    assert model.regression.weight.grad is None and model.regression.bias.grad is None
    assert model.detection.weight.grad.abs().sum() > 0
    assert model.trunk.weight.grad.abs().sum() > 0  # the trunk learns from detection


def test_detection_stage_needs_no_regression_output_or_target():
    model, batch = TwoHeads(), _batch()
    out = model(batch["image"])
    del out["offsets"], batch["offsets"]
    loss, parts = multitask_loss(out, batch, 1.0, "detection")
    assert parts["regression"] is None and loss.item() > 0


def test_regression_stage_ignores_detection():
    model, batch = TwoHeads(), _batch()
    out = model(batch["image"])
    loss, parts = multitask_loss(out, batch, lam=10.0, stage="regression")
    assert parts["detection"] is None
    torch.testing.assert_close(loss, regression_loss(out["offsets"], batch["offsets"]))
    loss.backward()
    assert model.detection.weight.grad is None
    # a model without a detection head (after the pretrain switch) and a batch without indicators
    out = {"offsets": model(batch["image"])["offsets"]}
    loss2, _ = multitask_loss(out, {"offsets": batch["offsets"]}, 1.0, "regression")
    torch.testing.assert_close(loss2, loss)


def test_unknown_stage_raises():
    model, batch = TwoHeads(), _batch()
    with pytest.raises(ValueError, match="'pretrain'.*joint, detection or regression"):
        multitask_loss(model(batch["image"]), batch, 1.0, "pretrain")
