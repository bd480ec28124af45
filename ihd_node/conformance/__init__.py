"""The DICOM Conformance Statement (PS3.2), generated from the code and configuration the node really uses.

`write_statement(config, fmt)` returns the statement as Markdown or HTML; `ihd-node conformance` calls it.
Sits above intake, report and delivery (it reads their contexts, objects and codes) and below commands.
"""

from __future__ import annotations

from ihd_node.config import Config
from ihd_node.conformance.document import statement
from ihd_node.conformance.facts import Facts, gather
from ihd_node.conformance.render import html_document, markdown, read_markdown_table
from ihd_node.conformance.specimen import Specimen, build_specimen

__all__ = ["Facts", "Specimen", "build_specimen", "gather", "read_markdown_table", "statement", "write_statement"]


def write_statement(config: Config, fmt: str = "md", specimen: Specimen | None = None) -> str:
    """The statement for this configuration: fmt "md" (Markdown) or "html"."""
    doc = statement(gather(config, specimen))
    return html_document(doc) if fmt == "html" else markdown(doc)
