"""Synthetic head-CT series ("phantoms") with labelled intracranial hemorrhage, written as real CT DICOM.

No real head CT can be downloaded here, so tests, the demo and the shipped default model use these.
The head is an analytic 3-D model in millimetres, in a head frame (x to the patient's left, y posterior,
z superior, origin at the centre of the cranial cavity at its widest level). Every slice is a plane
through that model placed by the scanner geometry (gantry tilt, head pose, table positions), so tilted
stacks, oblique cuts near the vertex and the skull base come out geometrically consistent, and a lesion
is one 3-D shape seen on several adjacent slices.

Speed: a linear function of the pixel indices is a column vector plus a row vector (broadcast), and
small structures are evaluated only in the pixel box where they cut the plane.

Modules, in the order a series is made: series (the value and its vocabularies), head (anatomy), scanner
(slice planes and pixel grids), lesions (placement and painting), render (one slice), encode (pixels and
DICOM attributes), make (make_series), write (files on disk).
"""

from ihd_node.sim.phantom.make import make_series
from ihd_node.sim.phantom.series import (
    ENCODINGS,
    MIN_LESION_MM2,
    RSNA_ORDER,
    TISSUE,
    VARIATION_KEYS,
    PhantomSeries,
)
from ihd_node.sim.phantom.write import describe, write_rsna_layout, write_series, write_study

__all__ = ["ENCODINGS", "MIN_LESION_MM2", "RSNA_ORDER", "TISSUE", "VARIATION_KEYS", "PhantomSeries", "describe",
           "make_series", "write_rsna_layout", "write_series", "write_study"]
