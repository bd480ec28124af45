"""Inference-only rewrites of the per-slice CNN that keep its results (bench/bench_model_cpu.py measures them).

fuse_conv_bn folds each eval-mode BatchNorm into the convolution before it: the same arithmetic up to
float rounding, one pass over the activations fewer. The fused copy has no BatchNorm modules and no
Grad-CAM hooks of the original, so the Predictor keeps the original for Grad-CAM.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


def fuse_conv_bn(cnn: nn.Module) -> nn.Module:
    """An eval-mode copy of `cnn` with every Conv2d -> BatchNorm2d pair folded into one Conv2d."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(cnn).eval(), inplace=True)


def cpu_has_bf16() -> bool:
    """The CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast can pay off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
