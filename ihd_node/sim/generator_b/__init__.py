"""Generator B: an independent synthetic head-CT generator, used only to validate and test models trained
on generator A (`ihd_node.sim.phantom`): "train on A, validate on B". It shares no code with A and
has its own anatomy (perturbed superquadric head, variable skull, random-field gyri and sulci, spline
ventricles), lesion models (see lesions.py), and scanner (tilt, partial volume, kernels, ramp-spectrum
noise, cupping, streaks). Training must never import it (tests/test_generator_b.py checks).

Modules: grid (random fields and shapes on 3-D boxes), ventricles, anatomy, lesions, scanner, case
(make_case, cohort_b).
"""

from ihd_node.sim.generator_b.case import MIN_AREA_MM2, CaseB, cohort_b, cohort_plan, make_case

__all__ = ["MIN_AREA_MM2", "CaseB", "cohort_b", "cohort_plan", "make_case"]
