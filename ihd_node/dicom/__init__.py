"""DICOM side of the node: reading, grouping, loading volumes, networking. Never imports torch."""
