"""DICOM side of the node: reading, grouping, loading volumes, networking. Never imports torch."""

from ihd_node.dicom import charsets as _charsets  # noqa: F401  (registers Latin-9 with pydicom)
