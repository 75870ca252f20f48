"""The learning-rate schedule (raypose.train.loop: lr_factor, steps_in_epoch, train_epoch): a half cosine
over each stage's epochs, set before every step, a function of (epoch, step) alone."""

import math

import numpy as np
import pytest
import torch

from raypose.config import Config, ConfigError, load_config
from raypose.data.dataset import PoseDataset
from raypose.train.loop import epoch_batches, lr_factor, stage_epochs, steps_in_epoch, train_epoch

CPU = torch.device("cpu")


def _cfg(**overrides) -> Config:
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_cosine_falls_from_one_to_zero_over_the_joint_run():
    assert Config().optim.lr_schedule == "constant"  # the default: checkpoints of before train on
    cfg = _cfg(epochs=4, lr_schedule="cosine")
    assert lr_factor(cfg, "joint", 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, "joint", 2, 0.0) == pytest.approx(0.5)  # half-way through 4 epochs
    assert lr_factor(cfg, "joint", 1, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, "joint", 3, 1.0) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(cfg, "joint", e, f) for e in range(4) for f in np.linspace(0, 1, 9)[:-1]]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling


def test_each_pretrain_stage_has_its_own_cosine():
    cfg = _cfg(epochs=10, schedule="pretrain", pretrain_share=0.3, lr_schedule="cosine")
    assert stage_epochs(cfg, "detection") == (0, 3) and stage_epochs(cfg, "regression") == (3, 7)
    assert lr_factor(cfg, "detection", 0) == pytest.approx(1.0)
    assert lr_factor(cfg, "detection", 2, 1.0) == pytest.approx(0.0, abs=1e-12)
    # the fresh regression head (and its new optimiser) starts again at the full rate
    assert lr_factor(cfg, "regression", 3) == pytest.approx(1.0)
    assert lr_factor(cfg, "regression", 6, 0.5) == pytest.approx(0.5)
    assert lr_factor(cfg, "regression", 9, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_and_a_bad_name():
    cfg = _cfg(epochs=4)
    assert {lr_factor(cfg, "joint", e, 0.5) for e in range(4)} == {1.0}
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        _cfg(**{"optim.lr_schedule": "linear"})


@pytest.mark.parametrize("epoch_samples,world_size", [(0, 1), (96, 1), (96, 2), (50, 3)])
def test_steps_in_epoch_counts_the_batches_an_epoch_yields(tiny_data, epoch_samples, world_size):
    cfg = _cfg(
        **{"data.path": tiny_data, "data.batch_size": 8, "data.epoch_samples": epoch_samples}
    )
    train = PoseDataset(
        f"{tiny_data}/train.h5", exclude_subjects=cfg.data.val_subjects, augment=True
    )
    for rank in range(world_size):
        counted = sum(1 for _ in epoch_batches(train, cfg, 1, rank, world_size, CPU))
        assert counted > 0 and steps_in_epoch(len(train), cfg, world_size) == counted


def test_train_epoch_sets_the_rate_before_every_step():
    cfg = _cfg(epochs=2, lr=1e-3, lr_schedule="cosine")
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )

    class Net(torch.nn.Module):  # the loss reads outputs["offsets"] against batch["offsets"]
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, image):
            return {"offsets": self.lin(image.flatten(1)).view(-1, 1, 1).expand(-1, 17, 3)}

    batches = [{"image": torch.ones(2, 3), "offsets": torch.zeros(2, 17, 3)}] * 4
    train_epoch(Net(), optimizer, batches, cfg, "regression", CPU, epoch=1, epoch_steps=4)
    # regression stage of a joint config: the whole 2-epoch run; epoch 1 covers t = 0.5 .. 0.875
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (1 + k / 4) / 2)) for k in range(4)]
    assert seen == pytest.approx(expected)
    # without epoch and epoch_steps (the benchmarks) the optimiser's rate is left as it is
    seen.clear()
    optimizer.param_groups[0]["lr"] = 0.123
    train_epoch(Net(), optimizer, batches, cfg, "regression", CPU)
    assert seen == [0.123] * 4
