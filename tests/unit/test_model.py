"""The Li & Chan network: layer sizes, parameter counts, the spatial LRN and the pretrain switch."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from raypose import cli
from raypose.config import load_config
from raypose.model.network import (
    LiChanNet,
    ModelConfig,
    SpatialLRN,
    count_parameters,
    regression_from_pretrained,
)


def _summary_lines(capsys, *extra):
    assert cli.main(["model-summary", *extra]) == 0
    return capsys.readouterr().out.splitlines()


def _row(lines, name):
    return next(line.split() for line in lines if line.split() and line.split()[0] == name)


def test_model_summary_prints_paper_shapes_and_counts(capsys):
    lines = _summary_lines(capsys)
    expected_shapes = {
        "input": "3x112x112",
        "conv1": "32x104x104",
        "pool1": "32x52x52",
        "conv2": "64x48x48",
        "lrn": "64x48x48",
        "pool2": "64x24x24",
        "conv3": "64x20x20",
        "pool3": "64x10x10",
        "fcr1": "1024",
        "fcr2": "2048",
        "fcr3": "51",
        "fcd1": "1024",
        "fcd2": "2048",
        "fcd3": "1700",
    }
    for layer, shape in expected_shapes.items():
        assert _row(lines, layer)[1] == shape, layer
    text = "\n".join(lines)
    for label, count in (
        ("trunk parameters", "161,536"),
        ("regression head parameters", "8,758,323"),
        ("detection head parameters", "12,137,124"),
        ("total parameters", "21,056,983"),
    ):
        line = next(line for line in lines if line.startswith(label))
        assert line.split()[-1] == count, line
    assert "21,056,983" in text
    # conv1: 9*9*3*32 + 32; fcr3: 2048*51 + 51
    assert _row(lines, "conv1")[2] == "7,808" and _row(lines, "fcr3")[2] == "104,499"


def test_model_summary_takes_model_overrides(capsys):
    lines = _summary_lines(capsys, "--set", "fc1_width=512")
    assert _row(lines, "fcr1")[1:] == ["512", "3,277,312"]  # 6400*512 + 512
    assert _row(lines, "fcr2")[2] == "1,050,624"  # 512*2048 + 2048


def test_parameter_counts_per_part():
    model = LiChanNet()
    assert count_parameters(model.trunk) == 161_536
    assert count_parameters(model.regression) == 8_758_323
    assert count_parameters(model.detection) == 12_137_124
    assert count_parameters(model) == 21_056_983


def test_forward_output_shapes():
    torch.manual_seed(0)
    model = LiChanNet().eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        features = model.trunk(images)
        out = model(images)
    assert features.shape == (2, 6400)
    assert set(out) == {"offsets", "detection_logits"}
    assert out["offsets"].shape == (2, 17, 3)
    assert out["detection_logits"].shape == (2, 17, 100)
    assert out["offsets"].abs().max() < 1  # tanh


def test_forward_with_one_head():
    with torch.no_grad():
        out = LiChanNet(regression=False).eval()(torch.zeros(1, 3, 112, 112))
    assert set(out) == {"detection_logits"}
    with torch.no_grad():
        out = LiChanNet(detection=False).eval()(torch.zeros(1, 3, 112, 112))
    assert set(out) == {"offsets"}


# --- the spatial LRN -------------------------------------------------------------------------

# u = [[1,1,1],[1,3,1],[1,1,1]], so u^2 is 1 everywhere but 9 in the centre. With a 3x3 window:
#   corner (0,0): in-map neighbours (0,0),(0,1),(1,0),(1,1): mean u^2 = (1+1+1+9)/4 = 3
#   edge (0,1):   6 neighbours:  mean u^2 = (5 + 9)/6 = 7/3
#   centre:       9 neighbours:  mean u^2 = (8 + 9)/9 = 17/9
LRN_INPUT = torch.tensor(
    [[[[1.0, 1.0, 1.0], [1.0, 3.0, 1.0], [1.0, 1.0, 1.0]]]], dtype=torch.float64
)


def test_spatial_lrn_hand_computed_alpha1_beta1():
    # u / (1 + mean u^2): corner 1/4, edge 1/(1 + 7/3) = 3/10, centre 3/(1 + 17/9) = 27/26
    expected = torch.tensor(
        [[1 / 4, 3 / 10, 1 / 4], [3 / 10, 27 / 26, 3 / 10], [1 / 4, 3 / 10, 1 / 4]],
        dtype=torch.float64,
    )
    out = SpatialLRN(alpha=1.0, beta=1.0, window=3)(LRN_INPUT)
    assert out.shape == LRN_INPUT.shape
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)


def test_spatial_lrn_hand_computed_beta_half():
    # beta = 0.5, alpha = 1: corner 1/sqrt(1 + 3) = 1/2 exactly; centre 3/sqrt(26/9) = 9/sqrt(26)
    out = SpatialLRN(alpha=1.0, beta=0.5, window=3)(LRN_INPUT)[0, 0]
    assert out[0, 0].item() == pytest.approx(0.5, abs=1e-12)
    assert out[2, 2].item() == pytest.approx(0.5, abs=1e-12)
    assert out[0, 1].item() == pytest.approx(1 / math.sqrt(10 / 3), abs=1e-12)
    assert out[1, 1].item() == pytest.approx(9 / math.sqrt(26), abs=1e-12)


def test_spatial_lrn_border_counts_only_in_map_neighbours():
    # counting the zero padding would give the corner a mean of 12/9 instead of 3
    out = SpatialLRN(alpha=1.0, beta=1.0, window=3)(LRN_INPUT)[0, 0, 0, 0].item()
    assert out == pytest.approx(0.25)
    assert out != pytest.approx(1 / (1 + 12 / 9))


def _lrn_reference(u: np.ndarray, alpha: float, beta: float, window: int) -> np.ndarray:
    """The formula of PAPER.md written out with loops: (B, C, H, W) -> (B, C, H, W)."""
    out = np.empty_like(u)
    half = window // 2
    _, _, height, width = u.shape
    for y in range(height):
        for x in range(width):
            patch = u[:, :, max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1]
            mean_sq = (patch**2).mean(axis=(2, 3))
            out[:, :, y, x] = u[:, :, y, x] / (1 + alpha * mean_sq) ** beta
    return out


def test_spatial_lrn_matches_the_formula_at_paper_settings():
    rng = np.random.default_rng(0)
    u = rng.normal(scale=20.0, size=(2, 3, 7, 6))
    out = SpatialLRN(alpha=0.0025, beta=0.75, window=5)(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(out, _lrn_reference(u, 0.0025, 0.75, 5), rtol=1e-12)


def test_spatial_lrn_is_per_map_not_cross_channel():
    torch.manual_seed(0)
    u = torch.rand(1, 4, 6, 6, dtype=torch.float64) * 10
    lrn = SpatialLRN(alpha=0.5, beta=0.75, window=3)
    changed = u.clone()
    changed[:, 1:] *= 5  # every channel but channel 0 changes
    out, out_changed = lrn(u), lrn(changed)
    torch.testing.assert_close(out[:, 0], out_changed[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1:], out_changed[:, 1:])
    # torch's LocalResponseNorm normalises across channels: channel 0 would move
    cross = nn.LocalResponseNorm(size=3, alpha=0.5, beta=0.75, k=1.0)
    assert not torch.allclose(cross(u)[:, 0], cross(changed)[:, 0])
    assert not torch.allclose(out, cross(u))


def test_spatial_lrn_rejects_even_window():
    with pytest.raises(ValueError, match="lrn_window"):
        SpatialLRN(0.1, 0.75, 4)


# --- the pretrain switch -----------------------------------------------------------------------


@pytest.mark.parametrize("with_regression_head", [False, True])
def test_regression_from_pretrained(with_regression_head):
    torch.manual_seed(0)
    old = LiChanNet(ModelConfig(lrn_alpha=0.01, dropout=0.5), regression=with_regression_head)
    old_trunk = {k: v.clone() for k, v in old.trunk.state_dict().items()}
    new = regression_from_pretrained(old)

    assert new.detection is None and new.regression is not None
    assert new.cfg == old.cfg and new.trunk.lrn.alpha == 0.01
    for name, tensor in new.trunk.state_dict().items():
        assert torch.equal(tensor, old_trunk[name]), name  # bit-identical
        assert tensor.data_ptr() != old.trunk.state_dict()[name].data_ptr()  # a copy, not shared
    # the fresh head is not the detection head's weights (nor an old regression head's)
    assert not torch.equal(new.regression.fc1.weight, old.detection.fc1.weight)
    assert not torch.equal(new.regression.fc2.weight, old.detection.fc2.weight)
    assert new.regression.fc3.out_features == 51
    if with_regression_head:
        for fc in ("fc1", "fc2", "fc3"):
            assert not torch.equal(
                getattr(new.regression, fc).weight, getattr(old.regression, fc).weight
            )
    assert count_parameters(new) == 161_536 + 8_758_323
    with torch.no_grad():
        out = new.eval()(torch.zeros(1, 3, 112, 112))
    assert set(out) == {"offsets"}
    # training the new model leaves the old trunk untouched
    with torch.no_grad():
        new.trunk.conv1.weight.add_(1.0)
    assert torch.equal(old.trunk.conv1.weight, old_trunk["conv1.weight"])


# --- settings flow from the config --------------------------------------------------------------


def test_model_settings_flow_from_model_config():
    cfg = ModelConfig(
        lrn_alpha=0.01, lrn_beta=0.5, lrn_window=3, dropout=0.75, fc1_width=8, fc2_width=16
    )
    model = LiChanNet(cfg)
    assert (model.trunk.lrn.alpha, model.trunk.lrn.beta, model.trunk.lrn.window) == (0.01, 0.5, 3)
    for head in (model.regression, model.detection):
        assert head.dropout.p == 0.75
        assert (head.fc1.out_features, head.fc2.in_features, head.fc2.out_features) == (8, 8, 16)
    assert model.detection.fc3.out_features == 1700


def test_model_settings_flow_from_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  lrn_alpha: 0.02\n  lrn_window: 7\n")
    cfg = load_config(path, ["lrn_beta=0.6", "dropout=0.1"])
    model = LiChanNet(cfg.model)
    assert (model.trunk.lrn.alpha, model.trunk.lrn.beta, model.trunk.lrn.window) == (0.02, 0.6, 7)
    assert model.regression.dropout.p == 0.1 and model.detection.dropout.p == 0.1


def test_dropout_is_active_only_in_training_mode():
    torch.manual_seed(0)
    model = LiChanNet(ModelConfig(dropout=0.5, fc1_width=64, fc2_width=32), detection=False)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)["offsets"], model(x)["offsets"])
        model.train()
        assert not torch.equal(model(x)["offsets"], model(x)["offsets"])
