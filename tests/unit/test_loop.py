"""The training step (raypose.train.loop): when bf16 autocast is on, and what it changes (the layers'
compute dtype) and what it keeps (float32 weights, optimiser and losses); a NaN or inf loss
stops the run."""

import math

import pytest
import torch

from raypose.config import Config
from raypose.model.losses import multitask_loss
from raypose.train.loop import (
    NonFiniteLossError,
    amp_active,
    autocast_for,
    build_model,
    build_optimizer,
    cpu_has_bf16_instructions,
    train_epoch,
)

CPU = torch.device("cpu")


def _cpuinfo(tmp_path, name: str, flags: str) -> str:
    path = tmp_path / name
    path.write_text(
        f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nflags\t\t: {flags}\n"
    )
    return str(path)


def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_bf16_instructions(
        _cpuinfo(tmp_path, "zen4", "fpu avx2 avx512f avx512_bf16 avx512_vnni")
    )
    assert cpu_has_bf16_instructions(
        _cpuinfo(tmp_path, "sapphire", "fpu avx512f amx_tile amx_bf16")
    )
    # AVX-512 alone (e.g. Skylake) emulates bf16, slower than float32: no autocast there
    assert not cpu_has_bf16_instructions(_cpuinfo(tmp_path, "skylake", "fpu avx2 avx512f avx512bw"))
    assert not cpu_has_bf16_instructions(_cpuinfo(tmp_path, "partial", "fpu avx512_bf16x"))
    assert not cpu_has_bf16_instructions(str(tmp_path / "no-such-file"))


def test_amp_setting_off_keeps_float32_everywhere():
    assert not amp_active(CPU, False)
    model = build_model(Config(), "joint").eval()
    with torch.no_grad(), autocast_for(CPU, False):
        out = model(torch.zeros(2, 3, 112, 112))
    assert out["offsets"].dtype == torch.float32


def test_autocast_on_cpu_follows_the_cpu_and_keeps_weights_and_losses_float32():
    cfg = Config()
    torch.manual_seed(0)
    model = build_model(cfg, "joint")
    optimizer = build_optimizer(cfg, model)
    with torch.no_grad(), autocast_for(CPU, True):
        out = model(torch.zeros(2, 3, 112, 112))
    # bf16 exactly where the CPU has the instructions (this machine's EPYC has avx512_bf16)
    expected = torch.bfloat16 if cpu_has_bf16_instructions() else torch.float32
    assert amp_active(CPU, True) == cpu_has_bf16_instructions()
    assert out["offsets"].dtype == expected

    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, 112, 112, generator=g),
        "offsets": torch.randn(4, 17, 3, generator=g),
        "detection": (torch.rand(4, 17, 100, generator=g) > 0.9).float(),
    }
    with autocast_for(CPU, True):
        outputs = model(batch["image"])
    loss, parts = multitask_loss(outputs, batch, cfg.loss.detection_weight, "joint")
    assert loss.dtype == parts["regression"].dtype == parts["detection"].dtype == torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(model, optimizer, [batch, batch], cfg, "joint", CPU)
    assert stats["steps"] == 2 and math.isfinite(stats["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained
    state = optimizer.state_dict()["state"]
    assert all(v["exp_avg"].dtype == torch.float32 for v in state.values())


# ----------------------------------------------------------------------------------------------
# a NaN or inf loss stops the run, naming the epoch, the step and the likely causes


def _batches(n: int, nan_at: int | None = None, seed: int = 0):
    """n random training batches of 2 samples; batch nan_at (0-based) has a NaN image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = torch.randn(2, 3, 112, 112, generator=g)
        if i == nan_at:
            image[0, 0, 0, 0] = float("nan")
        out.append(
            {
                "image": image,
                "offsets": torch.rand(2, 17, 3, generator=g) - 0.5,
                "detection": (torch.rand(2, 17, 100, generator=g) > 0.9).float(),
            }
        )
    return out


def _counted(batches, taken: list):
    for batch in batches:
        taken.append(1)
        yield batch


def _small_model(cfg):
    cfg.model.fc1_width, cfg.model.fc2_width = 16, 16
    torch.manual_seed(0)
    model = build_model(cfg, "joint")
    return model, build_optimizer(cfg, model)


def test_nan_weights_stop_the_first_step_naming_epoch_step_and_causes():
    cfg = Config()
    cfg.scaling.amp = False
    model, optimizer = _small_model(cfg)
    with torch.no_grad():
        model.regression.fc3.weight.fill_(float("nan"))  # as a bad checkpoint would load
    taken = []
    with pytest.raises(NonFiniteLossError) as err:
        train_epoch(
            model,
            optimizer,
            _counted(_batches(5), taken),
            cfg,
            "joint",
            CPU,
            epoch=2,
            epoch_steps=5,
        )
    message = str(err.value)
    assert "epoch 3 of 10, step 1 of 5" in message, message
    for cause in ("learning rate", "optim.lr", "colour statistics", "rgb_eigval", "checkpoint"):
        assert cause in message, message
    assert len(taken) == 1  # on the CPU the check reads every step: nothing ran past it
    assert isinstance(err.value, RuntimeError)


def test_a_huge_learning_rate_stops_the_run_on_tiny_data(tiny_data):
    from raypose.train.loop import epoch_batches, open_splits, steps_in_epoch

    cfg = Config()
    cfg.data.path = str(tiny_data)
    cfg.data.batch_size = 8
    cfg.optim.name, cfg.optim.lr = "sgd", 1e30
    cfg.scaling.amp = False
    train_set, _ = open_splits(cfg)
    model, optimizer = _small_model(cfg)
    steps = steps_in_epoch(len(train_set), cfg)
    with pytest.raises(
        NonFiniteLossError,
        match=rf"epoch 1 of 10, step [2-9] of {steps}.*"
        r"optim\.lr 1e\+30",
    ):
        train_epoch(
            model,
            optimizer,
            epoch_batches(train_set, cfg, 0),
            cfg,
            "joint",
            CPU,
            epoch=0,
            epoch_steps=steps,
        )


def test_the_first_bad_step_is_named_when_the_check_reads_every_n_steps():
    # as on a GPU: the record is kept on the device each step and read every check_every steps
    cfg = Config()
    cfg.scaling.amp = False
    model, optimizer = _small_model(cfg)
    taken = []
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 of 10, step 3 of 9\b"):
        train_epoch(
            model,
            optimizer,
            _counted(_batches(9, nan_at=2), taken),
            cfg,
            "joint",
            CPU,
            epoch=0,
            epoch_steps=9,
            check_every=4,
        )
    assert len(taken) == 4  # stopped at the first read after the NaN, not at the epoch's end
    # a NaN after the last read is found with the epoch's sums
    model, optimizer = _small_model(cfg)
    with pytest.raises(NonFiniteLossError, match=r"step 6\b"):
        train_epoch(model, optimizer, _batches(6, nan_at=5), cfg, "joint", CPU, check_every=4)
    # without epochs (the benchmarks) the step alone is named
    model, optimizer = _small_model(cfg)
    with pytest.raises(NonFiniteLossError, match=r"at step 2;"):
        train_epoch(model, optimizer, _batches(3, nan_at=1), cfg, "joint", CPU)


def test_finite_training_passes_every_check():
    cfg = Config()
    cfg.scaling.amp = False
    model, optimizer = _small_model(cfg)
    stats = train_epoch(model, optimizer, _batches(5), cfg, "joint", CPU, check_every=2)
    assert stats["steps"] == 5 and math.isfinite(stats["train_loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_nan_check_adds_no_wait_per_step_on_a_gpu():
    import warnings

    device = torch.device("cuda")
    cfg = Config()
    cfg.scaling.amp = False
    model, _ = _small_model(cfg)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    batches = [{k: v.to(device) for k, v in b.items()} for b in _batches(20)]

    def waits(n: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")  # a warning for every op that waits for the GPU
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_epoch(model, optimizer, batches[:n], cfg, "joint", device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert waits(5) == waits(20)  # as many waits for 20 steps as for 5: none per step

    # the check reads every NONFINITE_CHECK_STEPS steps, and still names the first bad step
    model, _ = _small_model(cfg)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    taken = []
    bad = [{k: v.to(device) for k, v in b.items()} for b in _batches(20, nan_at=2)]
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 of 10, step 3 of 20\b"):
        train_epoch(
            model, optimizer, _counted(bad, taken), cfg, "joint", device, epoch=0, epoch_steps=20
        )
    assert len(taken) == 20  # fewer steps than NONFINITE_CHECK_STEPS: found with the sums
