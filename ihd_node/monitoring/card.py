"""The model card's own validation figures, per class, from a checkpoint's metadata: what local performance is
shown against. Plain dict reading (no torch): the caller reads the checkpoint (ihd_node.model.checkpoint).

Where the figures are looked for, first found wins:
- metadata["validation"]: {"classes": {class: {...}}} or {class: {...}} (a retrained model may put them here);
- metadata["provenance"]["metrics"][split][level]["classes"], split held_out_phantoms / test / held_out, then
  validation; scan level before slice level (a result is per study, as a scan).
Every figure may be missing: absent ones are None, never invented.
"""

from __future__ import annotations

from typing import Any

from ihd_node.classes import CLASSES

FIGURES = ("auc", "sensitivity", "specificity", "ppv", "npv", "threshold", "positives", "negatives")
_SPLITS = ("held_out_phantoms", "test", "held_out", "validation", "val")
_LEVELS = ("scan", "study", "slice")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _per_class(block: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(block, dict):
        return {}
    classes = block.get("classes", block)
    if not isinstance(classes, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for c in CLASSES:
        figures = classes.get(c)
        if isinstance(figures, dict):
            entry: dict[str, Any] = {k: _number(figures.get(k)) for k in FIGURES}
            if any(v is not None for v in entry.values()):
                for k in ("positives", "negatives"):
                    entry[k] = None if entry[k] is None else int(entry[k])
                entry["source"] = source
                out[c] = entry
    return out


def card_figures(metadata: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """class -> {auc, sensitivity, specificity, ppv, npv, threshold, positives, negatives, source}; only the
    classes the card has figures for; {} when it has none."""
    if not isinstance(metadata, dict):
        return {}
    if set(metadata) & set(CLASSES) and all(isinstance(metadata[c], dict) for c in set(metadata) & set(CLASSES)):
        return _per_class(metadata, str(metadata.get("source", "model card")))  # already per class
    found = _per_class(metadata.get("validation"), "model card: validation")
    if found:
        return found
    provenance = metadata.get("provenance")
    metrics = provenance.get("metrics") if isinstance(provenance, dict) else None
    if not isinstance(metrics, dict):
        return {}
    for split in _SPLITS:
        levels = metrics.get(split)
        if not isinstance(levels, dict):
            continue
        for level in _LEVELS:
            block = levels.get(level)
            if isinstance(block, dict):
                n = block.get("n")
                source = f"model card: {split.replace('_', ' ')}, {level} level" + (f", n={n}" if n else "")
                found = _per_class(block, source)
                if found:
                    return found
    return {}
