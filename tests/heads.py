"""Full-head phantoms: what the tests send to a node that runs the shipped defaults, whose completion
evidence (series.check_geometry, series.check_coverage) holds a stack back until it reaches past the cranial
cavity at both ends. A phantom covers skull base to vertex when its stack is long enough (sim.phantom's
_coverage); this picks the slice spacing that makes it so for any drawn head and tilt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ihd_node.sim.phantom import PhantomSeries, make_series

# Skull base to vertex of the phantom's heads is at most 170 mm (over 2,000 seeds); a little more than that.
HEAD_SPAN_MM = 190.0
# The shipped max_slice_thickness_mm (10) ignores thicker slices: the fewest slices that span a head.
FEWEST_SLICES = 20


def full_head_spacing(n_slices: int) -> float:
    """Slice spacing (mm) at which `n_slices` reach from below the skull base to above the vertex."""
    if n_slices < FEWEST_SLICES:
        raise ValueError(f"a full head needs at least {FEWEST_SLICES} slices of at most 10 mm, not {n_slices}")
    return HEAD_SPAN_MM / (n_slices - 1)


def full_head(seed: int, subtypes: Sequence[str] | None = (), n_slices: int = 24, size: int = 128,
              **variation: Any) -> PhantomSeries:
    """A phantom series skull base to vertex; `subtypes` as make_series (None: drawn at random, empty:
    negative); small images keep tests fast."""
    variation.setdefault("slice_spacing", full_head_spacing(n_slices))
    chosen = None if subtypes is None else list(subtypes)
    return make_series(seed, subtypes=chosen, n_slices=n_slices, size=size, **variation)
