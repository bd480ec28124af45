"""SR storage classes a result can travel as, and re-labelling a built SR as another class.

Kept apart from sr.py (no highdicom) so the sender can use it. The report holds only 2D SCOORD regions,
so the same content is valid as Comprehensive 3D SR, Comprehensive SR and Enhanced SR; many PACS accept
only the older classes, and the sender falls back through them in association negotiation.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset

from ihd_node.uids import derived_uid

# SR classes in the order the sender falls back through them (destinations[].sr_class names the first).
SR_CLASSES: dict[str, str] = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}
SR_CLASS_NAMES = {"comprehensive3d": "Comprehensive 3D SR", "comprehensive": "Comprehensive SR",
                  "enhanced": "Enhanced SR"}


def sr_fallbacks(first: str) -> list[str]:
    """The SR classes to offer a destination, best first: its configured class and the simpler ones."""
    names = list(SR_CLASSES)
    if first not in SR_CLASSES:
        raise ValueError(f"unknown SR class {first!r}; use one of {', '.join(names)}")
    return names[names.index(first):]


def as_sr_class(sr: Dataset, sr_class: str) -> Dataset:
    """The same report as another SR class (only 2D SCOORD content, so valid in each).

    The copy gets its own SOP Instance UID, derived from the original's and the class, so two PACS that
    accepted different classes never hold two different objects under one UID.
    """
    uid = SR_CLASSES[sr_class]
    if str(sr.SOPClassUID) == uid:
        return sr
    other = copy.deepcopy(sr)
    other.SOPClassUID = uid
    other.SOPInstanceUID = derived_uid("ihd-node", "sr-class", str(sr.SOPInstanceUID), sr_class)
    if hasattr(other, "file_meta"):
        other.file_meta.MediaStorageSOPClassUID = uid
        other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    return other
