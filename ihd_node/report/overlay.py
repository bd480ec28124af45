"""Draw one secondary-capture picture: brain-window slice, Grad-CAM heat of each class, legend, warning.

Pure numpy + Pillow, so it can be looked at (and tested) without DICOM or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE, WINDOWS

# One colour per class; distinct hues so several subtypes on one slice stay apart.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "any": (170, 120, 255),
    "epidural": (230, 0, 230),
    "intraparenchymal": (235, 20, 20),
    "intraventricular": (0, 190, 255),
    "subarachnoid": (0, 210, 90),
    "subdural": (255, 225, 0),
}
HEAT_FLOOR = 0.3  # below this the map is noise; drawing it would tint the whole brain
MAX_ALPHA = 0.65

_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu when installed, else Pillow's built-in scalable font (bitmap font if FreeType is missing)."""
    for path in _FONT_FILES:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def brain_window(hu: np.ndarray) -> np.ndarray:
    """HU -> uint8 grey in the brain window (WC 40, WW 80), the window ICH is read in."""
    centre, width = WINDOWS[0]
    lo = centre - width / 2
    return (np.clip((hu - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def fit_heatmap(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Heatmap in [0, 1] resampled (bilinear) onto the image grid when the model saw another size."""
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    if heat.shape == shape:
        return heat
    img = Image.fromarray(heat, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _edge(mask: np.ndarray) -> np.ndarray:
    """Outline of a mask (mask minus its 4-neighbour erosion), so faint regions still show a border."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def blend_heatmaps(grey: np.ndarray, heatmaps: Mapping[str, np.ndarray]) -> np.ndarray:
    """RGB float image: grey slice with each class's heat alpha-blended in its colour, outlined."""
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    for cls, heat in heatmaps.items():
        heat = fit_heatmap(heat, grey.shape)
        colour = np.asarray(CLASS_COLOURS.get(cls, (255, 255, 255)), np.float32)
        mask = heat > HEAT_FLOOR
        alpha = np.where(mask, 0.25 + (MAX_ALPHA - 0.25) * (heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0)
        rgb = rgb * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        rgb[_edge(mask)] = colour
    return rgb


def _text_box(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def _fitting_size(draw: ImageDraw.ImageDraw, texts: list[str], size: int, max_width: int,
                  extra: int = 0) -> int:
    """Largest font size <= size at which every text fits max_width (small images get small text)."""
    while size > 6 and max(_text_box(draw, t, font(size))[0] for t in texts) + extra > max_width:
        size -= 1
    return size


def render(hu: np.ndarray, heatmaps: Mapping[str, np.ndarray], legend: list[tuple[str, float]],
           title: str) -> np.ndarray:
    """(rows, cols, 3) uint8: slice + heat + legend (class, probability) + NOT FOR DIAGNOSTIC USE.

    Legend classes whose heat is drawn get a colour swatch; the others (e.g. `any` next to its
    subtypes) are listed with their probability only.
    """
    rows, cols = hu.shape
    rgb = blend_heatmaps(brain_window(hu), heatmaps)
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image, "RGBA")
    base = max(9, min(rows, cols) // 32)  # 16 px on a 512 image
    labels = [title] + [f"{c} {p:.2f}" for c, p in legend]
    size = _fitting_size(draw, labels, base, int(cols * 0.9), extra=2 * base)
    big_size = _fitting_size(draw, [NOT_FOR_DIAGNOSTIC_USE], max(10, int(size * 1.4)), int(cols * 0.95))
    small, big = font(size), font(big_size)
    pad = max(2, size // 3)

    # Legend, top left, on a dark translucent panel so it reads over bone and heat alike.
    lines = [(title, None)] + [(f"{cls} {p:.2f}", cls if cls in heatmaps else "") for cls, p in legend]
    swatch = size
    widths = [_text_box(draw, text, small)[0] + (0 if cls is None else swatch + pad) for text, cls in lines]
    line_h = int(size * 1.35)
    draw.rectangle([0, 0, min(cols - 1, max(widths) + 2 * pad), pad * 2 + line_h * len(lines)],
                   fill=(0, 0, 0, 170))
    y = pad
    for text, cls in lines:
        x = pad
        if cls is not None:  # class line: swatch when its heat is drawn, else an indent
            if cls:
                draw.rectangle([x, y + 1, x + swatch - 2, y + swatch - 1],
                               fill=CLASS_COLOURS.get(cls, (255, 255, 255)))
            x += swatch + pad
        draw.text((x, y), text, font=small, fill=(255, 255, 255))
        y += line_h

    # The warning, bottom centre, large, on a red band: it must survive any viewer's window settings.
    w, h = _text_box(draw, NOT_FOR_DIAGNOSTIC_USE, big)
    band_top = rows - h - 3 * pad
    draw.rectangle([0, band_top, cols - 1, rows - 1], fill=(150, 0, 0, 200))
    draw.text(((cols - w) // 2, band_top + pad), NOT_FOR_DIAGNOSTIC_USE, font=big, fill=(255, 255, 255))
    return np.asarray(image, dtype=np.uint8).copy()
