"""Generator B (ihd_node.sim.generator_b) and the cross-generator evaluation (training/crossgen.py).

B exists to validate models trained on generator A, so it must be deterministic, its labels must match
the blood it draws, its tissues must have CT densities, and training must never see it."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.sim.generator_b import MIN_AREA_MM2, cohort_plan, make_case
from ihd_node.sim.generator_b.anatomy import T, draw_head
from training import cli, crossgen

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_slices": 10, "size": 64}


@pytest.fixture(scope="module")
def cases() -> dict[str, object]:
    """One small case per kind: a negative and each subtype alone."""
    out = {"negative": make_case(31, (), **SMALL)}
    for k, sub in enumerate(SUBTYPES):
        out[sub] = make_case(40 + k, (sub,), **SMALL)
    return out


def test_same_seed_same_series_other_seed_other_series() -> None:
    a = make_case(5, ("intraventricular",), **SMALL)
    b = make_case(5, ("intraventricular",), **SMALL)
    c = make_case(6, ("intraventricular",), **SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.slice_labels, b.slice_labels)
    assert a.hu.shape == c.hu.shape and not np.array_equal(a.hu, c.hu)


def test_labels_match_the_lesion_voxels(cases) -> None:
    neg = cases["negative"]
    assert not neg.masks.any() and not neg.slice_labels.any() and not neg.series_labels.any()
    for sub in SUBTYPES:
        case = cases[sub]
        j, k = SUBTYPES.index(sub), CLASSES.index(sub)
        assert case.subtypes == (sub,)
        assert case.series_labels.tolist() == [1 if c in ("any", sub) else 0 for c in CLASSES], sub
        area = ((case.masks & (1 << j)) > 0).sum(axis=(1, 2)) * case.pixel_spacing_mm ** 2
        labelled = case.slice_labels[:, k].astype(bool)
        assert labelled.any(), sub
        assert np.array_equal(labelled, area >= MIN_AREA_MM2 - 1e-6), sub
        assert np.array_equal(case.slice_labels[:, 0], case.slice_labels[:, 1:].max(axis=1))
        # Blood is denser than the brain around it: the lesion pixels are brighter than the slice's brain.
        on = np.flatnonzero(labelled)
        blood = case.hu[on][(case.masks[on] & (1 << j)) > 0]
        assert 35 < np.median(blood) < 100, (sub, float(np.median(blood)))


def test_mixed_case_has_both_subtypes() -> None:
    case = make_case(77, ("intraparenchymal", "intraventricular"), **SMALL)
    assert case.subtypes == ("intraparenchymal", "intraventricular")
    assert case.series_labels.tolist() == [1, 0, 1, 1, 0, 0]


def test_tissue_densities_are_those_of_head_ct() -> None:
    head = draw_head(np.random.default_rng(3))
    rng = np.random.default_rng(0)
    pts = rng.uniform([-90, -110, -60], [90, 110, 95], size=(120_000, 3))
    hu, code = head.evaluate(pts)
    expect = {"air": (-1001, -840), "fat": (-120, -60), "scalp": (20, 60), "bone": (1200, 1950),
              "diploe": (400, 950), "csf": (0, 15), "ventricle": (0, 15), "grey": (25, 50), "white": (15, 40),
              "falx": (45, 85)}
    for name, (lo, hi) in expect.items():
        values = hu[code == T[name]]
        assert values.size > 0, name
        assert lo <= np.median(values) <= hi, (name, float(np.median(values)))
    assert np.median(hu[code == T["grey"]]) > np.median(hu[code == T["white"]]) + 5
    # The image: air outside, brain-like values at the centre of a mid-level slice.
    case = make_case(8, (), n_slices=4, size=96)
    mid = case.hu[1]
    assert np.median(mid[:4]) < -900
    centre = mid[36:60, 36:60]
    assert 5 < np.median(centre) < 45


def test_cohort_plan_mix() -> None:
    plan = cohort_plan(8, seed=0)
    kinds = [k for _, k in plan]
    assert len(plan) == 60 and kinds.count(()) == 10
    assert all(kinds.count((s,)) == 8 for s in SUBTYPES)
    assert sum(len(k) == 2 for k in kinds) == 10
    assert len({s for s, _ in plan}) == 60
    assert {s for s, _ in cohort_plan(8, seed=1)}.isdisjoint(s for s, _ in plan)


def test_wilson_interval_and_ece_by_hand() -> None:
    lo, hi = crossgen.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert crossgen.wilson(0, 10)[0] == 0.0 and math.isnan(crossgen.wilson(0, 0)[0])
    # Bins [0, .1) [.1, .2) ... : |0 - .05|, |0 - .15|, |1 - .85|, |1 - .95| each a quarter of the data.
    ece, table = crossgen.reliability(np.array([0, 0, 1, 1]), np.array([0.05, 0.15, 0.85, 0.95]))
    assert ece == pytest.approx(0.25 * (0.05 + 0.15 + 0.15 + 0.05))
    assert [r["count"] for r in table] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    # Two samples in one bin: mean probability .265, observed .5 -> .235 * 2/3; 1.0 falls in the top bin.
    ece, table = crossgen.reliability(np.array([0, 1, 1]), np.array([0.25, 0.28, 1.0]))
    assert ece == pytest.approx(2 / 3 * 0.235 + 1 / 3 * 0.0)
    assert table[2]["count"] == 2 and table[9]["count"] == 1 and table[2]["observed"] == 0.5


def test_crossgen_end_to_end_on_a_tiny_model(cases, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = IhdModel(tiny_config())
    thresholds = dict.fromkeys(CLASSES, 0.5)
    predictor = Predictor.from_model(model, thresholds, "tiny", "0")
    series = [crossgen.EvalSeries(f"B:{c.seed}", c.subtypes, c.hu, c.slice_labels, c.pixel_spacing_mm,
                                  c.slice_spacing_mm) for c in cases.values()]
    labels, probs, records = crossgen.evaluate_cohort(predictor, series, verbose=False)
    assert labels.shape == probs.shape == (len(series), 6) and len(records) == len(series)
    for s, y, p in zip(series, labels, probs, strict=True):
        hu, _ = crossgen.node_input(s)
        assert np.array_equal(y, s.slice_labels.max(axis=0))
        assert np.allclose(p, predictor.predict(hu, explain=False).series_probabilities)
    report = crossgen.crossgen_metrics(labels, probs, thresholds)
    for k, c in enumerate(CLASSES):
        m = report[c]
        assert m["auc"] == pytest.approx(roc_auc_score(labels[:, k], probs[:, k]))
        called = probs[:, k] >= 0.5
        neg = labels[:, k] == 0
        assert m["called_when_absent"] == pytest.approx(called[neg].mean())
        assert m["specificity"] == pytest.approx(1 - called[neg].mean())
        assert sum(r["count"] for r in m["reliability"]) == len(series)
    # The command line: a checkpoint file, one tiny B cohort, JSON out.
    ckpt = save_checkpoint(tmp_path / "tiny.pt", model, thresholds=thresholds, name="tiny", version="0",
                           provenance={})
    jobs = crossgen.cohort_jobs("b", 1, 0, 48)[1]
    assert len(jobs) == 16 and all(size == 48 for _, _, size in jobs)
    out = tmp_path / "b.json"
    assert cli.main(["crossgen", "--checkpoint", str(ckpt), "--n", "1", "--size", "48", "--limit", "3",
                     "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["n_series"] == 3 and written["composition"] == {"negative": 1, "epidural": 1,
                                                                   "intraparenchymal": 1}
    assert set(written["classes"]) == set(CLASSES) and written["thresholds"]["any"] == 0.5
    assert written["classes"]["epidural"]["positives"] == 1


def test_thin_slices_become_slabs_as_in_the_node() -> None:
    hu = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 4, 4), np.float32)
    labels = np.zeros((8, 6), np.uint8)
    labels[5, [0, 2]] = 1
    s = crossgen.EvalSeries("x", ("intraparenchymal",), hu, labels, 0.5, 2.5)
    slabs, slab_labels = crossgen.node_input(s)
    assert slabs.shape[0] == 4 and slab_labels.shape == (4, 6)
    assert slab_labels[2, 2] == 1 and slab_labels.sum() == 2
    thick = crossgen.EvalSeries("y", (), hu, labels, 0.5, 5.0)
    assert crossgen.node_input(thick)[0].shape[0] == 8


TRAINING_PATHS = ["training/data.py", "training/augment.py", "training/run.py", "training/options.py",
                  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "training" / "stages").glob("*.py"))]
# phantom_recipe.py may evaluate on B (the model card), but its data building may not touch it.
RECIPE_DATA = {"series_plan", "phantom_volume", "_make_cached", "make_training_cache", "held_out_plan"}
FORBIDDEN = ("ihd_node.sim.generator_b", "training.crossgen")


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _forbidden(names: set[str]) -> set[str]:
    return {n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}


def test_training_never_imports_generator_b() -> None:
    for rel in TRAINING_PATHS:
        assert not _forbidden(_imported(ast.parse((ROOT / rel).read_text()))), rel
    recipe = ast.parse((ROOT / "training" / "phantom_recipe.py").read_text())
    top = {n for stmt in recipe.body if isinstance(stmt, ast.Import | ast.ImportFrom) for n in _imported(stmt)}
    assert not _forbidden(top), "phantom_recipe imports generator B at module level"
    functions = {f.name: f for f in ast.walk(recipe) if isinstance(f, ast.FunctionDef)}
    assert RECIPE_DATA <= set(functions), "phantom_recipe's data-building functions were renamed: update the test"
    for name in RECIPE_DATA:
        assert not _forbidden(_imported(functions[name])), name
    # And the check itself can fail: a crossgen-style import is caught.
    assert _forbidden(_imported(ast.parse("from ihd_node.sim.generator_b import make_case")))
