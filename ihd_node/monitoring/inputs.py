"""The input facts of an analysed series (manufacturer, scanner model, kernel, Enhanced vs classic CT, slice
thickness, kVp, pixel spacing), read from the loaded volume's headers for drift monitoring.

An Enhanced CT keeps kernel and kVp in its functional groups (CT Reconstruction, CT X-Ray Details), which the
flattened frame headers do not carry: they are read from the first source file's shared or first per-frame
group."""

from __future__ import annotations

from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ihd_node.imaging.headers import is_multiframe_ct, slice_thickness
from ihd_node.values.volume import Volume


def _text(value: Any, size: int = 64) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:size] or None


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _group_value(ds: Dataset, sequence: str, keyword: str) -> Any:
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups) or []
        if items and sequence in items[0] and items[0][sequence].value and keyword in items[0][sequence][0]:
            return items[0][sequence][0][keyword].value
    return None


def input_facts(volume: Volume) -> dict[str, object]:
    """The facts ihd_node.store.INPUT_FIELDS names; None where the headers do not say."""
    first = volume.headers[0] if volume.headers else Dataset()
    enhanced = bool(volume.slices) and (volume.slices[0].frame_number is not None or is_multiframe_ct(first))
    kernel, kvp = first.get("ConvolutionKernel"), first.get("KVP")
    if enhanced and (kernel is None or kvp is None):
        try:
            source = pydicom.dcmread(volume.slices[0].path, stop_before_pixels=True)
            kernel = kernel if kernel is not None else _group_value(source, "CTReconstructionSequence",
                                                                     "ConvolutionKernel")
            kvp = kvp if kvp is not None else _group_value(source, "CTXRayDetailsSequence", "KVP")
        except Exception:  # noqa: BLE001 - a fact not read is "not given", never a failed analysis
            pass
    return {"manufacturer": _text(first.get("Manufacturer")), "model_name": _text(first.get("ManufacturerModelName")),
            "kernel": _text(kernel), "enhanced": enhanced, "slice_thickness": slice_thickness(volume.headers),
            "kvp": _number(kvp), "pixel_spacing": float(min(volume.pixel_spacing)) if volume.pixel_spacing else None}


def record_inputs(db: Any, series_instance_uid: str, volume: Volume) -> None:
    """Keep the series' input facts (the analysis is booked already; a failure here is logged, not fatal)."""
    from ihd_node import nodelog

    try:
        db.record_series_inputs(series_instance_uid, input_facts(volume))
    except Exception as exc:  # noqa: BLE001 - drift monitoring must never fail an analysis
        nodelog.warning("drift.inputs_not_recorded", series=series_instance_uid,
                        error=f"{type(exc).__name__}: {exc}")
