"""What the CPU trainer computes in bf16 and in which memory format, decided here and nowhere else.

On the GPU the trainer always uses bf16 autocast and channels_last (``TRAIN.AMP``, ``TRAIN.CHANNELS_LAST``).
On the CPU neither always pays: bf16 convolutions are fast only where the CPU multiplies bf16 in hardware
(AVX512_BF16 or AMX, used by oneDNN), and even there only when the convolutions are big enough to hide
the casts autocast adds around every op. Measured with ``python -m bench.bench_step --device cpu --bf16
--channels-last`` (bench/README.md, "CPU precision and memory format"), 2 vCPUs AMD EPYC with AVX512_BF16
(no AMX), 2026-12-03, loaded by other jobs, img/s ratio to the fp32 step, median of 3 interleaved rounds:

* bf16 autocast: ResNet-18 at 32 px 0.18-0.27x, at 64 px 0.27-0.35x, ResNet-50 at 64 px 0.46x (one run
  1.36x on a loaded machine); ResNet-18 at 112 px 1.74x, at 224 px 1.91x; ResNet-50 at 112 px 1.48x,
  160 px 1.69x, 224 px 1.81x. Small maps lose (casts and BN around tiny convolutions), >= 112 px wins.
* channels_last in fp32: 0.78-1.5x, and with bf16 0.5-1.1x of bf16 alone: no consistent win, so the CPU
  keeps NCHW.

So the CPU gets bf16 autocast only when :func:`native_bf16` (x86 Linux with the ``avx512_bf16`` or
``amx_bf16`` flag, and oneDNN not capped below AVX512_CORE_BF16 by ``ONEDNN_MAX_CPU_ISA``) and the shape
is one where it won (:func:`cpu_bf16_wins`); everything else, including every AVX2-only CPU, stays fp32.
The arithmetic under bf16 is the documented GPU one: encoder convs/matmuls in bf16, normalisation,
similarities, logits, loss and queue in fp32 (``pretrain/moco.py``, tests/pretrain/test_moco_precision.py).
``TRAIN.AMP False`` keeps fp32 everywhere. Neither choice depends on timing, so a run's numbers depend only
on the machine and the config, never on the load.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from moco_d2.core.backbone import ARCHS
from moco_d2.core.threads import ONEDNN_ISA_VARIABLES

# CPU flags (Linux /proc/cpuinfo names) of hardware bf16 dot products oneDNN uses for convolutions.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) below its first bf16 ISA, AVX512_CORE_BF16.
ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
# Smallest crop where bf16 autocast beat fp32 for every stock ResNet measured (ResNet-18 and -50).
BF16_MIN_SIZE = 112


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 claimed
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16() -> bool:
    """True when oneDNN may run bf16 convolutions in hardware on this CPU."""
    for variable in ONEDNN_ISA_VARIABLES:
        if os.environ.get(variable, "").upper() in ISAS_WITHOUT_BF16:
            return False
    return bool(BF16_FLAGS & _cpu_flags())


def cpu_bf16_wins(arch: str, image_size: int) -> bool:
    """The measured rule: bf16 autocast beats fp32 for this architecture and crop size on a CPU with
    native bf16: stock-width ResNets on crops of at least :data:`BF16_MIN_SIZE` pixels."""
    spec = ARCHS.get(arch)
    return spec is not None and spec.stock and image_size >= BF16_MIN_SIZE


def cpu_channels_last_wins(arch: str, image_size: int) -> bool:
    """NHWC memory on the CPU: never (no shape measured a consistent win, see the module docstring)."""
    del arch, image_size
    return False


def cpu_amp(arch: str, image_size: int) -> bool:
    """bf16 autocast for a CPU run of ``arch`` at ``image_size`` when TRAIN.AMP is on."""
    return native_bf16() and cpu_bf16_wins(arch, image_size)
