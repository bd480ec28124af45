"""Validation of audit messages against the audit message schema of PS3.15 A.5.1 (the RELAX NG file next to
this module, converted from the standard's compact syntax; its header says how)."""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from lxml import etree

SCHEMA_FILE = Path(__file__).with_name("dicom-audit-message.rng")
_lock = threading.Lock()  # an lxml RelaxNG object is not documented as thread-safe; validation is cheap


@cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))


def schema_errors(xml: str | bytes) -> list[str]:
    """Why `xml` is not a valid DICOM audit message ([] when it is)."""
    try:
        document = etree.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed XML: {exc}"]
    with _lock:
        schema = _schema()
        if schema.validate(document):
            return []
        return [f"line {e.line}: {e.message}" for e in schema.error_log] or ["invalid (no detail from lxml)"]
