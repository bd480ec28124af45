"""Draw one secondary-capture picture: the slice at full size, Grad-CAM heat of each present class, and
around it (never over it) the source's series/image/table position, orientation letters, a legend with
probability and threshold, the model and NOT FOR DIAGNOSTIC USE.

Pure numpy + Pillow, so it can be looked at (and tested) without DICOM or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ihd_node.classes import FINDING_NAMES, NOT_FOR_DIAGNOSTIC_USE, WINDOWS

# One colour per class from the Okabe-Ito palette, which stays distinct with red-green colour blindness.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "any": (204, 121, 167),  # reddish purple
    "epidural": (213, 94, 0),  # vermillion
    "intraparenchymal": (230, 159, 0),  # orange
    "intraventricular": (86, 180, 233),  # sky blue
    "subarachnoid": (0, 158, 115),  # bluish green
    "subdural": (240, 228, 66),  # yellow
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


def _around(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The mask's bounding box grown by one pixel (within the image); None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))


def blend_heatmaps(grey: np.ndarray, heatmaps: Mapping[str, np.ndarray]) -> np.ndarray:
    """RGB float image: grey slice with each class's heat alpha-blended in its colour, outlined.

    Blended inside the heat's bounding box only: outside it alpha is 0, which leaves a pixel as it was
    (x * 1 + 0), so the picture is the same as blending the whole slice (test), in a fraction of the time.
    The box keeps a one-pixel margin so that the outline sees the same neighbours."""
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    for cls, heat in heatmaps.items():
        heat = fit_heatmap(heat, grey.shape)
        colour = np.asarray(CLASS_COLOURS.get(cls, (255, 255, 255)), np.float32)
        box = _around(heat > HEAT_FLOOR)
        if box is None:
            continue
        heat = heat[box]
        mask = heat > HEAT_FLOOR
        alpha = np.where(mask, 0.25 + (MAX_ALPHA - 0.25) * (heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0)
        part = rgb[box] * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        part[_edge(mask)] = colour
        rgb[box] = part
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


@dataclass(frozen=True)
class Picture:
    """A rendered capture: (H, W, 3) uint8 pixels, with the slice's pixel (r, c) at (top + r, left + c)."""

    pixels: np.ndarray
    top: int
    left: int


@dataclass(frozen=True)
class LegendLine:
    """One class in the legend: its probability and the threshold it was judged against."""

    cls: str
    probability: float
    threshold: float

    @property
    def text(self) -> str:
        # Percent, as the SR and the summary write probabilities.
        return (f"{FINDING_NAMES.get(self.cls, self.cls)} {100 * self.probability:.0f} % "
                f"(threshold {100 * self.threshold:.0f} %)")


@dataclass(frozen=True)
class Orientation:
    """Patient direction letters at the image's left, right, top and bottom edges ('' when unknown)."""

    left: str = ""
    right: str = ""
    top: str = ""
    bottom: str = ""


def render(hu: np.ndarray, heatmaps: Mapping[str, np.ndarray], legend: Sequence[LegendLine],
           header: Sequence[str], orientation: Orientation = Orientation(),
           footer: Sequence[str] = ()) -> Picture:
    """The slice at full size (rows, cols) framed by bands that carry all the text.

    Image pixel (r, c) lands at (top + r, side + c); nothing is drawn inside that rectangle except the
    heat. header: lines above the image (source series/image/position); legend: present classes with a
    colour swatch when their heat is drawn; footer: extra lines below the legend (model, time);
    NOT FOR DIAGNOSTIC USE closes the bottom band on red.
    """
    rows, cols = hu.shape
    rgb = blend_heatmaps(brain_window(hu), heatmaps)
    size = max(10, min(rows, cols) // 32)  # 16 px on a 512 image
    fnt, big = font(size), font(max(11, int(size * 1.3)))
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    pad = max(3, size // 3)
    line_h = int(size * 1.4)
    side = _text_box(probe, "W", fnt)[0] + 2 * pad  # room for one orientation letter
    texts = list(header) + [line.text for line in legend] + list(footer) + [NOT_FOR_DIAGNOSTIC_USE]
    # Wide enough for the longest text line (small images get a wider frame, never clipped text).
    width = max(cols + 2 * side, max(_text_box(probe, t, big if t == NOT_FOR_DIAGNOSTIC_USE else fnt)[0]
                                     for t in texts) + 2 * pad + size + pad)
    side = (width - cols) // 2
    width = cols + 2 * side
    top = pad + line_h * len(header) + line_h  # header lines, then the top orientation letter
    warn_h = _text_box(probe, NOT_FOR_DIAGNOSTIC_USE, big)[1] + 2 * pad
    bottom = line_h + pad + line_h * (len(legend) + len(footer)) + pad + warn_h
    image = Image.new("RGB", (width, top + rows + bottom), (0, 0, 0))
    image.paste(Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB"), (side, top))
    draw = ImageDraw.Draw(image)
    white, grey = (255, 255, 255), (200, 200, 200)

    y = pad
    for text in header:
        draw.text((pad, y), text, font=fnt, fill=white)
        y += line_h

    def letter(text: str, x: int, y: int) -> None:
        if text:
            w, h = _text_box(draw, text, fnt)
            draw.text((x - w // 2, y - h // 2), text, font=fnt, fill=white)

    letter(orientation.top, side + cols // 2, top - line_h // 2)
    letter(orientation.bottom, side + cols // 2, top + rows + line_h // 2)
    letter(orientation.left, side // 2, top + rows // 2)
    letter(orientation.right, side + cols + side // 2, top + rows // 2)

    y = top + rows + line_h + pad
    for line in legend:
        x = pad
        if line.cls in heatmaps:
            draw.rectangle([x, y + 1, x + size - 2, y + size - 1], fill=CLASS_COLOURS.get(line.cls, white))
        draw.text((x + size + pad, y), line.text, font=fnt, fill=white)
        y += line_h
    for text in footer:
        draw.text((pad, y), text, font=fnt, fill=grey)
        y += line_h
    # The warning on a red band: it must survive any viewer's window settings.
    band_top = image.height - warn_h
    draw.rectangle([0, band_top, width - 1, image.height - 1], fill=(150, 0, 0))
    w, _ = _text_box(draw, NOT_FOR_DIAGNOSTIC_USE, big)
    draw.text(((width - w) // 2, band_top + pad), NOT_FOR_DIAGNOSTIC_USE, font=big, fill=white)
    return Picture(np.asarray(image, dtype=np.uint8).copy(), top, side)
