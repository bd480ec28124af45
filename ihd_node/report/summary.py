"""The report in a doctor's words: the summary sentence every result carries (SR text, alert, console).

"Intracranial hemorrhage suspected: subdural (97 %), right convexity, images 14-19 of series 2. Not for
diagnostic use. ..." Probabilities are written as percent, as the SR carries them (UCUM "%").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ihd_node.classes import INCOMPLETE_SERIES, INCOMPLETE_SERIES_LINE
from ihd_node.report.naming import slices_phrase
from ihd_node.report.regions import largest_part
from ihd_node.report.source import LossyHistory
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

# Where a subtype lies, in the words of a report: extra-axial bleeds along the convexity, and so on.
PLACE_WORDS = {"epidural": "convexity", "subdural": "convexity", "subarachnoid": "sulci",
               "intraparenchymal": "hemisphere", "intraventricular": "ventricles", "any": ""}


def percent(probability: float) -> str:
    """'97 %': a probability as a doctor reads it (and as OHIF prints the SR's UCUM '%' values)."""
    return f"{100.0 * float(probability):.0f} %"


def reported_classes(prediction: Prediction) -> list[str]:
    """The present findings a doctor reads: the subtypes; `any` only when no subtype is present."""
    present = prediction.positive_classes()
    return [c for c in present if c != "any"] or [c for c in present if c == "any"]


def _side(volume: Volume, index: int, heat: np.ndarray) -> str:
    """'right' / 'left' / '' (midline or unknown) for the hot part of a heatmap, from the patient's side."""
    hot = largest_part(heat >= 0.5 * float(heat.max())) if heat.max() > 0 else np.zeros_like(heat, bool)
    if not hot.any():
        return ""
    head = np.nonzero((volume.hu[index] > -300).any(axis=0))[0]
    if head.size == 0:
        return ""
    centre = (head.min() + head.max()) / 2
    offset = (np.nonzero(hot)[1].mean() - centre) / max(1.0, head.max() - head.min())
    iop = [float(v) for v in volume.headers[index].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if abs(offset) < 0.05 or abs(iop[0]) < 0.5:
        return ""
    # +x is the patient's left; the row direction cosine says where +column points.
    return "left" if offset * iop[0] > 0 else "right"


def _place(volume: Volume, prediction: Prediction, cls: str, groups: list[list[int]]) -> str:
    """'right convexity': the side of most key-slice maps and the subtype's usual place."""
    sides = []
    for (index, c), heat in prediction.heatmaps.items():
        if c == cls:
            shown = groups[index][len(groups[index]) // 2]
            sides.append(_side(volume, shown, heat))
    side = max(set(sides), key=sides.count) if sides else ""
    if sides.count(side) <= len(sides) / 2 or cls == "intraventricular":
        side = ""  # no clear side (or both), or a place that has none
    return " ".join(w for w in (side, PLACE_WORDS.get(cls, "")) if w)


def _image_range(volume: Volume, prediction: Prediction, classes: Sequence[str],
                 groups: list[list[int]]) -> str:
    """'images 14-19 of series 2' (or 'image 1 frames 5-9 of series 3'), the source's own numbers."""
    return slices_phrase(volume, {o for c in classes for m in prediction.positive_slices(c) for o in groups[m]})


def lossy_text(history: LossyHistory | None) -> str:
    """The SR's statement that the analysed images were lossy compressed ('' when they were not)."""
    if history is None:
        return ""
    how = ", ".join(f"{m} {r}:1" if r else m for m, r in zip(history.methods, history.ratios or
                                                          [""] * len(history.methods), strict=True))
    return (f" The analysed images were lossy compressed ({how or 'method not stated'}); "
            "compression artefacts may affect the findings.")


def incomplete_text(prediction: Prediction) -> str:
    """'INCOMPLETE SERIES - ...: <reasons>. ' ahead of the summary of a partial series ('' otherwise)."""
    return f"{INCOMPLETE_SERIES_LINE}: {prediction.incomplete}. " if prediction.incomplete else ""


def replaces_text(prediction: Prediction) -> str:
    """The sentence of a result on the complete series that replaces an INCOMPLETE SERIES one."""
    if not prediction.replaces_preliminary:
        return ""
    return (f" This result, on the complete series, replaces the {INCOMPLETE_SERIES} result "
            f"{prediction.replaces_preliminary}.")


def summary_text(volume: Volume, prediction: Prediction, groups: list[list[int]] | None = None,
                 lossy: LossyHistory | None = None) -> str:
    """The report in one or two sentences a doctor reads first; never the class name "any"."""
    groups = groups or [[i] for i in range(volume.n_slices)]
    model = prediction.model
    classes = reported_classes(prediction)
    if not classes:
        finding = "No intracranial hemorrhage detected."
    else:
        parts = []
        for cls in classes:
            name = "type not determined" if cls == "any" else cls
            place = _place(volume, prediction, cls, groups)
            parts.append(f"{name} ({percent(prediction.series_probability(cls))})" + (f", {place}" if place else ""))
        images = _image_range(volume, prediction, classes, groups)
        finding = f"Intracranial hemorrhage suspected: {'; '.join(parts)}" + (f", {images}" if images else "") + "."
    text = (f"{finding} Not for diagnostic use. Research software output from {model.name} {model.version}, "
            f"not verified by a physician.{lossy_text(lossy)}")
    return incomplete_text(prediction) + text + replaces_text(prediction)
