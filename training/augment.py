"""Batched augmentation in torch, on the training device, of the cached windowed channels (B, 3, S, S):
HU calibration and noise, light blur, then horizontal flip, shift, rotation, scale and brightness, then
the paper's normalisation.

HU changes are applied through each window's linear map: a gain g and offset o in HU move a channel
value x = (h - low) / width to g * x + ((g - 1) * low + o) / width, exact inside the window; pixels
clipped at 0 or 1 (air, bone) stay clipped, since their true HU is far outside. This lets the model see
other scanners' calibration and noise (a lesion at 55 HU on one machine reads 62 on another); the
geometric part mirrors the paper's Albumentations pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD, WINDOWS


def _per_channel(values: tuple[float, ...] | list[float], x: torch.Tensor) -> torch.Tensor:
    """A per-window value for each channel of x: (1, C, 1, 1); C = 3 x slices for 2.5D input."""
    v = torch.tensor(values, device=x.device, dtype=x.dtype)
    return v.repeat(x.shape[1] // len(values)).view(1, -1, 1, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - _per_channel(CHANNEL_MEAN, x)) / _per_channel(CHANNEL_STD, x)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Cached uint8 windowed channels -> float in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def to_input(images: torch.Tensor) -> torch.Tensor:
    """No augmentation: cached windowed channels -> the normalised input inference computes."""
    return normalise(to_unit(images))


@dataclass
class AugmentConfig:
    """Ranges of the random transforms; `strength` scales all of them (0 = off)."""

    flip: float = 0.5  # probability of a horizontal flip
    shift: float = 0.08  # fraction of the image size
    rotate: float = 20.0  # degrees
    scale: float = 0.15  # +- relative zoom
    brightness: float = 0.06  # additive, windowed [0, 1] units
    contrast: float = 0.10  # +- relative, windowed units
    hu_offset: float = 8.0  # +- HU added to the whole slice (calibration)
    hu_scale: float = 0.08  # +- relative HU gain around water
    noise_hu: float = 12.0  # up to this Gaussian noise std in HU
    blur: float = 0.5  # probability of a light blur (softer reconstruction kernels)
    strength: float = 1.0

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(strength=0.0)


class Augmenter:
    """Callable: cached windowed channels -> normalised network input, randomly transformed."""

    def __init__(self, config: AugmentConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.cfg = config or AugmentConfig()
        self.gen = generator

    def _u(self, n: int, device: torch.device, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return (torch.rand(n, generator=self.gen) * (high - low) + low).to(device)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        """(B, 3 g, S, S) cached windowed channels of g slices (uint8 or [0, 1] float) -> normalised,
        augmented input.

        With masks ((B, K, s, s) float lesion maps, any s), returns (input, masks moved by the same geometry).
        """
        c, s = self.cfg, self.cfg.strength
        x = to_unit(images)
        if s <= 0:
            return normalise(x) if masks is None else (normalise(x), masks)
        b, dev = x.shape[0], x.device
        # 2.5D input holds g slices of three windows: one calibration, geometry and brightness per
        # image (the slices come from one scan), an independent noise field per slice.
        g = x.shape[1] // 3
        low = _per_channel([wc - ww / 2.0 for wc, ww in WINDOWS], x)
        width = _per_channel([float(ww) for _, ww in WINDOWS], x)
        inside = (x > 0.0) & (x < 1.0)
        # HU calibration: gain around water (0 HU) and an offset, through each window's linear map.
        gain = (1.0 + c.hu_scale * s * self._u(b, dev)).view(b, 1, 1, 1)
        offset = (c.hu_offset * s * self._u(b, dev)).view(b, 1, 1, 1)
        moved = gain * x + ((gain - 1.0) * low + offset) / width
        if c.noise_hu > 0:
            sigma = (c.noise_hu * s * self._u(b, dev, 0.0, 1.0)).view(b, 1, 1, 1)
            noise = torch.randn((b, g, 1, *x.shape[-2:]), generator=self.gen).to(dev)
            noise = noise.expand(b, g, 3, *x.shape[-2:]).reshape(x.shape)
            moved = moved + sigma * noise / width  # one HU noise field per slice, seen through its three windows
        x = torch.where(inside, moved, x).clamp(0.0, 1.0)
        if c.blur > 0:
            k = torch.tensor([0.25, 0.5, 0.25], device=dev)
            kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 3, 3)
            blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
            mix = (self._u(b, dev, 0.0, 1.0) < c.blur * s).float() * self._u(b, dev, 0.3, 1.0)
            x = x + mix.view(b, 1, 1, 1) * (blurred - x)
        # Geometry: one affine grid per image (rotation, zoom, shift) and a horizontal flip.
        angle = math.radians(c.rotate * s) * self._u(b, dev)
        zoom = 1.0 + c.scale * s * self._u(b, dev)
        flip = torch.where(self._u(b, dev, 0.0, 1.0) < c.flip, -1.0, 1.0)
        tx, ty = 2 * c.shift * s * self._u(b, dev), 2 * c.shift * s * self._u(b, dev)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], dim=1),
                             torch.stack([sin * flip, cos, ty], dim=1)], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Zero padding = below every window = air, which is what surrounds a head.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:  # same transform in normalised coordinates, on the coarser mask grid
            mask_grid = grid if masks.shape[-2:] == x.shape[-2:] else \
                F.affine_grid(theta, list(masks.shape), align_corners=False)
            masks = F.grid_sample(masks.float(), mask_grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False)
        contrast = 1.0 + c.contrast * s * self._u(b, dev)
        bright = c.brightness * s * self._u(b, dev)
        x = (x * contrast.view(b, 1, 1, 1) + bright.view(b, 1, 1, 1)).clamp(0.0, 1.0)
        return normalise(x) if masks is None else (normalise(x), masks)
