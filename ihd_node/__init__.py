"""ihd-node: a DICOM node giving a second opinion on intracranial hemorrhage. Not for diagnostic use."""

__version__ = "0.1.0"

from ihd_node import charsets as _charsets  # noqa: E402,F401  (registers Latin-9 with pydicom before any read)
