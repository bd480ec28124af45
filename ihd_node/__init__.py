"""ihd-node: a DICOM node giving a second opinion on intracranial hemorrhage. Not for diagnostic use."""

__version__ = "0.1.0"
