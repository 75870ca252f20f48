"""The Li & Chan (ACCV 2014) network: a shared conv trunk with a regression and a detection head.

Layer names follow the paper (conv1..conv3, fcr1..fcr3, fcd1..fcd3); sizes follow PAPER.md.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from raypose.config import (
    ModelConfig,
)  # the model's settings live with the other config (torch-free)

NUM_JOINTS = 17
DETECTION_GRID = 10  # 10 x 10 windows of 30 px, stride 10, on the 112 px crop
INPUT_SIZE = 112


class SpatialLRN(nn.Module):
    """f(u) = u / (1 + alpha * mean_{window}(u^2)) ^ beta, per feature map (not across channels).

    The mean runs over a square window centred on each position; at the borders only the
    positions inside the map count (|Wx||Wy| is the number of neighbours that exist).
    """

    def __init__(self, alpha: float, beta: float, window: int):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"lrn_window must be an odd positive integer, got {window}")
        self.alpha, self.beta, self.window = alpha, beta, window

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # count_include_pad=False divides by the neighbours inside the map
        mean_sq = F.avg_pool2d(
            u * u, self.window, stride=1, padding=self.window // 2, count_include_pad=False
        )
        return u / (1.0 + self.alpha * mean_sq).pow(self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, window={self.window}"


class Trunk(nn.Module):
    """conv1..pool3, shared by both tasks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 9)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.lrn = SpatialLRN(cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_window)
        self.conv3 = nn.Conv2d(64, 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (B, 32, 104, 104)
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)  # (B, 32, 52, 52)
        x = F.relu(self.conv2(x))  # (B, 64, 48, 48)
        x = self.lrn(x)  # (B, 64, 48, 48)
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)  # (B, 64, 24, 24)
        x = self.conv3(x)  # (B, 64, 20, 20), linear
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)  # (B, 64, 10, 10)
        return x.flatten(1)  # (B, 6400)


class Head(nn.Module):
    """Three fully connected layers: fc1 ReLU + dropout, fc2 ReLU, fc3 (activation applied by caller)."""

    def __init__(self, in_features: int, out_features: int, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(in_features, cfg.fc1_width)
        self.fc2 = nn.Linear(cfg.fc1_width, cfg.fc2_width)
        self.fc3 = nn.Linear(cfg.fc2_width, out_features)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LiChanNet(nn.Module):
    """Shared trunk; regression head (17 x 3 tanh) and detection head (17 x 100 logits).

    forward returns what the losses need: a dict with
      'offsets'          (B, 17, 3) tanh outputs = scaled parent-relative offsets, if the head exists
      'detection_logits' (B, 17, 100) logits, if the head exists
    """

    def __init__(
        self, cfg: ModelConfig | None = None, regression: bool = True, detection: bool = True
    ):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.trunk = Trunk(self.cfg)
        features = 64 * 10 * 10
        self.regression = Head(features, NUM_JOINTS * 3, self.cfg) if regression else None
        self.detection = (
            Head(features, NUM_JOINTS * DETECTION_GRID**2, self.cfg) if detection else None
        )

    def forward(self, images: torch.Tensor) -> dict:
        features = self.trunk(images)  # (B, 6400)
        out = {}
        if self.regression is not None:
            out["offsets"] = torch.tanh(self.regression(features)).view(-1, NUM_JOINTS, 3)
        if self.detection is not None:
            out["detection_logits"] = self.detection(features).view(
                -1, NUM_JOINTS, DETECTION_GRID**2
            )
        return out


def regression_from_pretrained(detection_model: LiChanNet) -> LiChanNet:
    """The pretrain schedule's switch: keep conv1..conv3, drop the detection head and attach a
    freshly initialised regression head. No detection FC weight is copied into the regression FC."""
    model = LiChanNet(detection_model.cfg, regression=True, detection=False)
    model.trunk.load_state_dict(detection_model.trunk.state_dict())
    return model.to(next(detection_model.parameters()).device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(cfg: ModelConfig | None = None) -> str:
    """Each layer's output shape for one 3 x 112 x 112 image, and the parameter counts."""
    model = LiChanNet(cfg).eval()
    lines = [f"{'layer':<8} {'output':>14} {'params':>12}"]
    rows = []
    x = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    t = model.trunk

    def shape(x):
        return "x".join(str(s) for s in x.shape[1:])

    with torch.no_grad():
        rows.append(("input", shape(x), 0))
        x = F.relu(t.conv1(x))
        rows.append(("conv1", shape(x), count_parameters(t.conv1)))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        rows.append(("pool1", shape(x), 0))
        x = F.relu(t.conv2(x))
        rows.append(("conv2", shape(x), count_parameters(t.conv2)))
        x = t.lrn(x)
        rows.append(("lrn", shape(x), 0))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        rows.append(("pool2", shape(x), 0))
        x = t.conv3(x)
        rows.append(("conv3", shape(x), count_parameters(t.conv3)))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        rows.append(("pool3", shape(x), 0))
        for prefix, head in (("fcr", model.regression), ("fcd", model.detection)):
            for i, fc in enumerate((head.fc1, head.fc2, head.fc3), start=1):
                rows.append((f"{prefix}{i}", str(fc.out_features), count_parameters(fc)))
    for name, out, n in rows:
        lines.append(f"{name:<8} {out:>14} {n:>12,}")
    lines.append(f"trunk parameters:            {count_parameters(model.trunk):>12,}")
    lines.append(f"regression head parameters:  {count_parameters(model.regression):>12,}")
    lines.append(f"detection head parameters:   {count_parameters(model.detection):>12,}")
    lines.append(f"total parameters:            {count_parameters(model):>12,}")
    return "\n".join(lines)
