"""HU slices -> the network's input: three windows as channels, linear resize, per-channel normalisation.

Paper section 3.1: brain (40/80), subdural (80/200) and soft-tissue (40/380) windows, 256x256 linear
resize, mean/std normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD, WINDOWS

_CPU_CHUNK = 4  # slices per windowing step on the CPU


def _window_bounds(windows: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    centre = np.asarray([w[0] for w in windows], dtype=np.float64)
    width = np.asarray([w[1] for w in windows], dtype=np.float64)
    return centre - width / 2.0, width


def window_channels(hu: np.ndarray, windows: Sequence[Sequence[float]] = WINDOWS) -> np.ndarray:
    """(n, H, W) HU -> (n, 3, H, W) float32 in [0, 1]: each window clipped to [WC-WW/2, WC+WW/2], scaled."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected HU slices of shape (n, rows, cols), got {hu.shape}")
    low, width = _window_bounds(windows)
    out = np.empty((hu.shape[0], len(windows), *hu.shape[1:]), dtype=np.float32)
    for c in range(len(windows)):
        out[:, c] = (np.clip(hu, low[c], low[c] + width[c]) - np.float32(low[c])) / np.float32(width[c])
    return out


def prepare_slices(
    hu: np.ndarray | torch.Tensor,
    input_size: int,
    device: torch.device | str | None = None,
    windows: Sequence[Sequence[float]] = WINDOWS,
    mean: Sequence[float] = CHANNEL_MEAN,
    std: Sequence[float] = CHANNEL_STD,
) -> torch.Tensor:
    """(n, H, W) HU -> (n, 3, S, S) normalised network input, computed in torch on `device`.

    Equivalent to window_channels -> bilinear resize -> (x - mean) / std. The window scaling and the
    normalisation are affine, and bilinear interpolation commutes with affine maps (its weights sum
    to 1), so we clip at full resolution, resize the clipped HU and apply one fused affine map at the
    small size: same result, a fraction of the work.
    """
    x = torch.as_tensor(hu, dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"expected HU slices of shape (n, rows, cols), got {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    low_np, width_np = _window_bounds(windows)
    low = torch.as_tensor(low_np, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    width = torch.as_tensor(width_np, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    n, rows, cols = x.shape
    resize = (rows, cols) != (input_size, input_size)
    out = torch.empty((n, len(windows), input_size, input_size), dtype=torch.float32, device=x.device)
    # A few slices at a time on the CPU: the full-resolution 3-channel temporary of a whole series is
    # ~100 MB, and allocating it costs more than the arithmetic.
    step = n if x.device.type != "cpu" else _CPU_CHUNK
    for start in range(0, n, step):
        chunk = x[start:start + step].unsqueeze(1)
        clipped = torch.clamp(chunk, min=low, max=low + width)  # still HU, (k, 3, H, W)
        if resize:
            # The paper's "linear interpolation": bilinear, half-pixel centres, no anti-aliasing.
            clipped = F.interpolate(clipped, size=(input_size, input_size), mode="bilinear",
                                    align_corners=False, antialias=False)
        out[start:start + step] = clipped
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    # ((hu - low) / width - mean) / std  ==  hu * scale + shift
    scale = 1.0 / (width * s)
    shift = -(low / width + m) / s
    return out.mul_(scale).add_(shift)
