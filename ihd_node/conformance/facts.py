"""What the conformance statement says, read from the code and the config the node really runs with.

Nothing here is a second list of SOP classes or syntaxes: the accepted contexts are the Receiver's
(`intake.receiver.accepted_contexts`), the proposed ones the sender's (`delivery.sender.requested_contexts`
applied to a specimen result set that the report stage really builds), the codes and templates are read out
of those objects, and the character sets out of pydicom's tables as `ihd_node.charsets` extends them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom import charset
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import sop_class as pynetdicom_classes

from ihd_node import charsets
from ihd_node.config import Config
from ihd_node.conformance.specimen import Specimen, build_specimen
from ihd_node.delivery.sender import COUNT_CONTEXTS, ECHO_CONTEXTS, requested_contexts
from ihd_node.imaging.headers import CT_CLASSES
from ihd_node.intake.receiver import accepted_contexts

charsets.register()  # idempotent; the statement lists what the node's pydicom can read and write

# Names pydicom's dictionary lacks (newer classes), from pynetdicom's keywords ("LabelMapSegmentationStorage").
_KEYWORDS = {str(v): k for k, v in vars(pynetdicom_classes).items() if isinstance(v, str) and v.startswith("1.2.840")}


def uid_name(uid: str) -> str:
    """A readable name for a SOP class or transfer syntax UID."""
    name = UID(uid).name
    if name != uid:
        return name
    keyword = _KEYWORDS.get(uid)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", keyword) if keyword else "(no name in the local dictionaries)"


@dataclass(frozen=True)
class Context:
    """One presentation context: an abstract syntax with the transfer syntaxes offered or accepted in it."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    role: str  # "SCP" (the node accepts it) or "SCU" (the node proposes it)


@dataclass(frozen=True)
class Activity:
    """A real-world activity of the SCU (PS3.2 'Association Initiation Policy')."""

    name: str
    description: str  # when an association is opened, and what it carries
    contexts: tuple[Context, ...]


@dataclass(frozen=True)
class CreatedObject:
    """One kind of SOP instance the node creates, read from the specimen result set."""

    kind: str
    sop_class: str
    transfer_syntax: str
    modality: str
    series_description: str
    template: str  # "DCMR 1500" etc.; "" when the object has no content template
    attributes: tuple[str, ...]  # top-level attribute keywords present
    values: tuple[tuple[str, str], ...]  # fixed values worth stating (flags, types)


@dataclass
class CodeUse:
    scheme: str
    value: str
    meaning: str
    used_in: set[str] = field(default_factory=set)


@dataclass
class Facts:
    config: Config
    scp_contexts: list[Context]
    scu_activities: list[Activity]
    created: list[CreatedObject]
    codes: list[CodeUse]
    templates: list[tuple[str, str, int]]  # (template, title, how many in the specimen SR)
    primitives: dict[str, bool]  # AIR result primitives: encoded or not
    private_tags: list[str]
    character_sets: list[tuple[str, str]]  # (defined term, Python codec)
    analysed_classes: list[str] = field(default_factory=lambda: sorted(CT_CLASSES))


# -- created objects -------------------------------------------------------------------------------------

_KINDS = {"SR": "AI result (TID 1500)", "OT": "Grad-CAM secondary capture", "SEG": "Attention regions",
          "KO": "Key images"}
_STATED = ("ImageType", "ConversionType", "BurnedInAnnotation", "LossyImageCompression", "CompletionFlag",
           "VerificationFlag", "PreliminaryFlag", "SegmentationType", "ContentLabel", "ContentDescription",
           "PhotometricInterpretation", "SpecificCharacterSet")


def _kind(ds: Dataset) -> str:
    kind = _KINDS.get(str(ds.Modality), str(ds.Modality))
    title = ds.get("ConceptNameCodeSequence")
    if str(ds.Modality) == "KO" and title and str(title[0].CodeValue) == "113037":
        kind = "IOCM rejection note"
    return kind


def _template(ds: Dataset) -> str:
    seq = ds.get("ContentTemplateSequence")
    if not seq:
        return ""
    return f"{seq[0].get('MappingResource', '')} {seq[0].get('TemplateIdentifier', '')}".strip()


def created_objects(specimen: Specimen) -> list[CreatedObject]:
    seen: dict[str, CreatedObject] = {}
    for ds in specimen.objects():
        kind = _kind(ds)
        if kind in seen:
            continue
        meta = getattr(ds, "file_meta", None)
        values = tuple((k, "\\".join(str(v) for v in ds[k].value) if ds[k].VM > 1 else str(ds[k].value))
                       for k in _STATED if k in ds)
        seen[kind] = CreatedObject(
            kind=kind, sop_class=str(ds.SOPClassUID), transfer_syntax=str(meta.TransferSyntaxUID) if meta else "",
            modality=str(ds.Modality), series_description=str(ds.get("SeriesDescription", "")),
            template=_template(ds), attributes=tuple(e.keyword for e in ds if e.keyword and not e.tag.is_private),
            values=values)
    return list(seen.values())


# -- codes and templates -----------------------------------------------------------------------------------

def _items(ds: Dataset) -> Iterator[Dataset]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield item
                yield from _items(item)


def coded_terms(specimen: Specimen) -> list[CodeUse]:
    found: dict[tuple[str, str], CodeUse] = {}
    for ds in specimen.objects():
        kind = _kind(ds)
        for item in _items(ds):
            value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
            scheme = item.get("CodingSchemeDesignator")
            if value is None or scheme is None:
                continue
            use = found.setdefault((str(scheme), str(value)), CodeUse(str(scheme), str(value),
                                                                      str(item.get("CodeMeaning", ""))))
            use.used_in.add(kind)
    return sorted(found.values(), key=lambda c: (c.scheme, c.value))


def _concept(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodingSchemeDesignator), str(seq[0].CodeValue)) if seq else ("", "")


def _content(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []) or []:
        yield child
        yield from _content(child)


MEASUREMENT_GROUP = ("DCM", "125007")
IMAGE_LIBRARY = ("DCM", "111028")
REFERENCED_SEGMENT = ("DCM", "121191")
ALGORITHM_NAME = ("DCM", "111001")
OBSERVER_TYPE = ("DCM", "121005")
TRACKING = {("DCM", "112039"), ("DCM", "112040")}


def sr_templates(sr: Dataset) -> tuple[list[tuple[str, str, int]], dict[str, bool]]:
    """Templates the specimen SR instantiates (root from ContentTemplateSequence, the rest recognised by
    their content), and which IHE AIR result primitives it encodes."""
    counts = {"TID 1501": 0, "TID 1410": 0, "TID 1411": 0}
    items = list(_content(sr))
    for item in items:
        if _concept(item) != MEASUREMENT_GROUP:
            continue
        inner = list(_content(item))
        if any(_concept(i) == REFERENCED_SEGMENT for i in inner):
            counts["TID 1411"] += 1
        elif any(str(i.ValueType) in ("SCOORD", "SCOORD3D") for i in inner):
            counts["TID 1410"] += 1
        else:
            counts["TID 1501"] += 1
    concepts = {_concept(i) for i in items}
    root = _template(sr).replace("DCMR ", "TID ")
    rows = [(root, "Imaging Measurement Report (root)", 1)]
    if OBSERVER_TYPE in concepts:
        rows.append(("TID 1002 / TID 1004", "Observer Context, Device Observer Identifying Attributes", 1))
    if IMAGE_LIBRARY in concepts:
        rows.append(("TID 1600", "Image Library", 1))
    titles = {"TID 1501": "Measurement and Qualitative Evaluation Group (one per finding class)",
              "TID 1410": "Planar ROI Measurements and Qualitative Evaluations (outline per key slice)",
              "TID 1411": "Volumetric ROI Measurements and Qualitative Evaluations (Segmentation segment)"}
    rows += [(tid, titles[tid], n) for tid, n in counts.items() if n]
    if ALGORITHM_NAME in concepts:
        rows.append(("TID 4019", "Algorithm Identification", sum(_concept(i) == ALGORITHM_NAME for i in items)))
    types = {str(i.ValueType) for i in items}
    graphic = {str(i.get("GraphicType", "")) for i in items if str(i.ValueType) in ("SCOORD", "SCOORD3D")}
    primitives = {
        "Qualitative findings": "CODE" in types,
        "Measurements": "NUM" in types,
        "Locations (points)": bool(graphic & {"POINT", "MULTIPOINT"}),
        "Regions (outlines, segmentations)": bool(graphic & {"POLYLINE", "POLYGON", "ELLIPSE", "CIRCLE"})
        or counts["TID 1411"] > 0,
        "Parametric maps": False,  # no Parametric Map instance is created (see created objects)
        "Tracking identifiers": bool({_concept(i) for i in items} & TRACKING),
        "Image references": "IMAGE" in types,
    }
    return rows, primitives


def private_tags(specimen: Specimen) -> list[str]:
    tags: set[str] = set()
    for ds in specimen.objects():
        tags |= {str(e.tag) for e in ds if e.tag.is_private}
        tags |= {str(e.tag) for item in _items(ds) for e in item if e.tag.is_private}
    return sorted(tags)


DEFINED_TERM = r"ISO_IR \d+|ISO 2022 IR \d+|GB18030|GBK"


# -- network -----------------------------------------------------------------------------------------------

def scu_activities(config: Config, specimen: Specimen) -> list[Activity]:
    objects = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in specimen.objects()]
    sr_classes = sorted({d.sr_class for d in config.dicom_destinations}) or ["comprehensive3d"]
    activities = []
    for sr_class in sr_classes:
        who = [d.name for d in config.dicom_destinations if d.sr_class == sr_class]
        contexts = tuple(Context(a, tuple(t), "SCU") for a, t in requested_contexts(objects, sr_class))
        activities.append(Activity(
            f"Send results (sr_class {sr_class})",
            "An association is opened when a result set, or a rejection note, is due in the outbox for "
            + (f"destination(s) {', '.join(who)}" if who else "a DICOM destination") + "; it carries every object "
            "due for that destination and is released when they are answered. One association per destination "
            "at a time; a refused or failed association leaves the objects due for a later retry.", contexts))
    activities.append(Activity(
        "Verify destinations", "`ihd-node echo --config FILE` opens one association per DICOM destination, "
        "sends one C-ECHO and releases it.", tuple(Context(a, tuple(t), "SCU") for a, t in ECHO_CONTEXTS)))
    counted = [d.name for d in config.dicom_destinations if d.count_instances]
    activities.append(Activity(
        "Count a series' instances at the PACS",
        "Before a quiet series is judged complete, the node asks each destination with count_instances: true "
        + (f"({', '.join(counted)})" if counted else "(none in this configuration)")
        + " with one Study Root C-FIND at SERIES level for NumberOfSeriesRelatedInstances, then releases.",
        tuple(Context(a, tuple(t), "SCU") for a, t in COUNT_CONTEXTS)))
    return activities


def gather(config: Config, specimen: Specimen | None = None) -> Facts:
    """Every fact the statement states. `specimen`: reuse a built one (tests); built here otherwise."""
    specimen = specimen or build_specimen()
    templates, primitives = sr_templates(specimen.results.sr)
    # DICOM's defined terms only ("ISO_IR 6" is not one: read as the default repertoire; pydicom's aliases out)
    sets = [(t, c) for t, c in charset.python_encoding.items() if re.fullmatch(DEFINED_TERM, t) and t != "ISO_IR 6"]
    return Facts(
        config=config,
        scp_contexts=[Context(a, tuple(t), "SCP") for a, t in accepted_contexts(mpps=True)],
        scu_activities=scu_activities(config, specimen),
        created=created_objects(specimen),
        codes=coded_terms(specimen),
        templates=templates,
        primitives=primitives,
        private_tags=private_tags(specimen),
        character_sets=sorted(sets),
    )
