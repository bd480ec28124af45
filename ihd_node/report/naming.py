"""How a result names the source slices a doctor pages to: instance numbers, and frames of a multi-frame
(Enhanced / Legacy Converted Enhanced CT) instance, where every frame is the same instance.

"images 14-19 of series 2"; "image 1 frames 5-9 of series 3"; "image 1 frame 7".
"""

from __future__ import annotations

from collections.abc import Iterable

from ihd_node.values.volume import Volume


def _instance(volume: Volume, o: int) -> int | None:
    number = volume.slices[o].instance_number
    if number is not None:
        return number
    try:
        return int(volume.headers[o].InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return None


def _span(numbers: list[int], one: str, many: str) -> str:
    lo, hi = min(numbers), max(numbers)
    if lo == hi:
        return f"{one} {lo}"
    if len(set(numbers)) == hi - lo + 1:
        return f"{many} {lo}-{hi}"
    return f"{many} {', '.join(str(n) for n in sorted(set(numbers)))}"


def slice_name(volume: Volume, o: int) -> str:
    """'image 22', or 'image 1 frame 7' for a frame of a multi-frame instance ('' when unnumbered)."""
    number = _instance(volume, o)
    if number is None:
        return ""
    frame = volume.slices[o].frame_number
    return f"image {number}" + (f" frame {frame}" if frame is not None else "")


def series_words(volume: Volume) -> str:
    series = str(volume.headers[0].get("SeriesNumber", "") or "").strip()
    return f" of series {series}" if series else ""


def slices_phrase(volume: Volume, originals: Iterable[int]) -> str:
    """'images 14-19 of series 2' / 'image 1 frames 5-9 of series 3' ('' when none is numbered)."""
    by_instance: dict[int, list[int]] = {}
    single: list[int] = []
    for o in sorted(set(originals)):
        number = _instance(volume, o)
        if number is None:
            continue
        frame = volume.slices[o].frame_number
        if frame is None:
            single.append(number)
        else:
            by_instance.setdefault(number, []).append(frame)
    parts = [_span(single, "image", "images")] if single else []
    parts += [f"image {n} " + _span(frames, "frame", "frames") for n, frames in sorted(by_instance.items())]
    return ", ".join(parts) + series_words(volume) if parts else ""
