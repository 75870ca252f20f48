"""Mixed precision in the training step (raypose.loop): when bf16 autocast is on, and what it
changes (the layers' compute dtype) and what it keeps (float32 weights, optimiser and losses)."""

import math

import torch

from raypose.config import Config
from raypose.loop import (amp_active, autocast_for, build_model, build_optimizer,
                          cpu_has_bf16_instructions, train_epoch)
from raypose.losses import multitask_loss

CPU = torch.device("cpu")


def _cpuinfo(tmp_path, name: str, flags: str) -> str:
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    return str(path)


def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_bf16_instructions(_cpuinfo(tmp_path, "zen4", "fpu avx2 avx512f avx512_bf16 avx512_vnni"))
    assert cpu_has_bf16_instructions(_cpuinfo(tmp_path, "sapphire", "fpu avx512f amx_tile amx_bf16"))
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
    batch = {"image": torch.randn(4, 3, 112, 112, generator=g),
             "offsets": torch.randn(4, 17, 3, generator=g),
             "detection": (torch.rand(4, 17, 100, generator=g) > 0.9).float()}
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
