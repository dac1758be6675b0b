"""The CPU trainer's bf16 / memory-format choice follows the measured rule and the machine, never the load."""

from __future__ import annotations

import pytest
import torch

from moco_d2.core import cpu
from moco_d2.core.config import pretrain_defaults
from moco_d2.core.threads import ONEDNN_ISA_VARIABLES
from pretrain.train import amp_dtype_for, channels_last_for

CPU = torch.device("cpu")
AVX512_BF16_FLAGS = frozenset({"fpu", "avx2", "avx512f", "avx512bw", "avx512_bf16"})
AVX2_FLAGS = frozenset({"fpu", "avx2", "fma"})


@pytest.fixture
def flags(monkeypatch):
    """Pretend to run on a CPU with the given /proc/cpuinfo flags, without ISA caps from the environment."""
    for variable in ONEDNN_ISA_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def use(cpu_flags: frozenset[str]) -> None:
        monkeypatch.setattr(cpu, "_cpu_flags", lambda: cpu_flags)

    return use


def cfg_for(arch: str, size: int, amp: bool = True, channels_last: bool = True):
    cfg = pretrain_defaults()
    cfg.MODEL.ARCH, cfg.AUG.SIZE, cfg.TRAIN.AMP, cfg.TRAIN.CHANNELS_LAST = arch, size, amp, channels_last
    return cfg


def test_native_bf16_needs_the_cpu_flag_and_an_uncapped_onednn(flags, monkeypatch):
    flags(AVX2_FLAGS)
    assert not cpu.native_bf16()
    flags(AVX512_BF16_FLAGS)
    assert cpu.native_bf16()
    flags(AVX512_BF16_FLAGS | {"amx_bf16"})
    assert cpu.native_bf16()
    flags(frozenset({"amx_bf16"}))
    assert cpu.native_bf16()
    flags(AVX512_BF16_FLAGS)
    for isa in ("AVX2", "avx512_core", "AVX512_CORE_VNNI"):  # oneDNN capped below its bf16 ISA
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert not cpu.native_bf16(), isa
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu.native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name for the same switch
    assert not cpu.native_bf16()


def test_the_real_cpu_flags_are_read():
    # whatever this machine is, the parse finds its flags line (every x86-64 Linux CPU lists sse2)
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads /proc/cpuinfo of x86-64 Linux")
    assert "sse2" in cpu._cpu_flags()


def test_bf16_only_on_native_cpus_and_where_it_won(flags):
    big, small = BF16_SHAPES_WON[0], BF16_SHAPES_LOST[0]
    flags(AVX512_BF16_FLAGS)
    assert amp_dtype_for(cfg_for(*big), CPU) == torch.bfloat16
    assert amp_dtype_for(cfg_for(*small), CPU) is None
    assert amp_dtype_for(cfg_for(*big, amp=False), CPU) is None  # TRAIN.AMP False: fp32 everywhere
    flags(AVX2_FLAGS)
    assert amp_dtype_for(cfg_for(*big), CPU) is None  # no bf16 hardware: fp32 whatever the shape


# Shapes measured on both sides of the rule (bench/README.md, "CPU precision and memory format").
BF16_SHAPES_WON = [
    ("resnet50", 224),
    ("resnet50", 160),
    ("resnet50", 112),
    ("resnet18", 112),
    ("resnet18", 224),
]
BF16_SHAPES_LOST = [("resnet18_small", 28), ("resnet18", 32), ("resnet18", 64), ("resnet50", 64)]


@pytest.mark.parametrize("shape", BF16_SHAPES_WON)
def test_rule_keeps_the_measured_wins(shape):
    assert cpu.cpu_bf16_wins(*shape)


@pytest.mark.parametrize("shape", BF16_SHAPES_LOST)
def test_rule_keeps_fp32_where_bf16_lost(shape):
    assert not cpu.cpu_bf16_wins(*shape)


def test_channels_last_on_the_cpu_follows_its_rule_and_the_config(flags):
    flags(AVX512_BF16_FLAGS)
    for arch, size in BF16_SHAPES_WON + BF16_SHAPES_LOST:
        assert channels_last_for(cfg_for(arch, size), CPU) == cpu.cpu_channels_last_wins(arch, size)
        assert not channels_last_for(cfg_for(arch, size, channels_last=False), CPU)
