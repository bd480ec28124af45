"""Local performance (issue 19): the statistics against statsmodels and scikit-learn, and a phantom cohort sent
through a running node, its truth imported with `ihd-node labels import`, then every figure of
`ihd-node performance --json` against a direct computation from the database rows and the truth.

References nobody here wrote: statsmodels' proportion_confint(method="wilson"), sklearn's roc_auc_score and
roc_curve. The DeLong interval is checked against a plain O(m n) computation written from the paper's
definitions (placement values), independent of the midrank one the node uses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from cohort import Cohort, run_cohort, truth_rows, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve
from sqlalchemy import select
from statsmodels.stats.proportion import proportion_confint

from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main
from ihd_node.monitoring import (
    AUC_MIN_CASES,
    auc_with_interval,
    calibration_deciles,
    operating_points,
    wilson_interval,
)
from ihd_node.monitoring.performance import MIN_READS, local_performance
from ihd_node.store import Analysis, Database, NewRead, Series, Study, open_database

ROOT = Path(__file__).resolve().parents[1]
CT = "1.2.840.10008.5.1.4.1.1.2"


# ------------------------------------------------------------------ the statistics against the references

@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 2000), data=st.data(), confidence=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_interval_is_statsmodels(n: int, data: st.DataObject, confidence: float) -> None:
    k = data.draw(st.integers(0, n))
    low, high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((low, high), abs=1e-12)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _delong_by_pairs(scores: np.ndarray, truths: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """DeLong et al. 1988 from the definitions: psi over every (positive, negative) pair."""
    pos, neg = scores[truths == 1], scores[truths == 0]
    psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return auc, max(0.0, auc - z * math.sqrt(var)), min(1.0, auc + z * math.sqrt(var))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), m=st.integers(10, 80), n=st.integers(10, 80), digits=st.sampled_from([1, 2, 6]),
       shift=st.floats(-1, 3))
def test_auc_is_sklearn_and_the_interval_delong(seed: int, m: int, n: int, digits: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    truths = np.array([1] * m + [0] * n)
    rng.shuffle(truths)
    raw = rng.normal(size=m + n) + shift * truths
    scores = np.round(1 / (1 + np.exp(-raw)), digits)  # rounding makes ties, within and across the classes
    auc, low, high = auc_with_interval(scores, truths)
    assert auc == pytest.approx(roc_auc_score(truths, scores), abs=1e-12)
    assert (auc, low, high) == pytest.approx(_delong_by_pairs(scores, truths, 0.95), abs=1e-9)


def test_auc_needs_enough_cases_of_each_class() -> None:
    assert auc_with_interval([0.1] * 9 + [0.9] * 30, [1] * 9 + [0] * 30) is None
    assert auc_with_interval([0.1] * 10 + [0.9] * 10, [0] * 10 + [1] * 10) == (1.0, 1.0, 1.0)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), size=st.integers(2, 120), digits=st.sampled_from([1, 2, 6]))
def test_operating_points_are_the_roc_curve(seed: int, size: int, digits: int) -> None:
    rng = np.random.default_rng(seed)
    truths = rng.integers(0, 2, size)
    truths[:2] = [0, 1]  # both classes
    scores = np.round(rng.random(size) * (0.5 + truths * 0.3), digits)
    fpr, tpr, thresholds = roc_curve(truths, scores, drop_intermediate=False)
    points = {p.threshold: p for p in operating_points(scores, truths)}
    finite = [i for i, t in enumerate(thresholds) if np.isfinite(t) and t <= 1.0]
    assert sorted(points) == sorted(float(thresholds[i]) for i in finite)
    for i in finite:
        p = points[float(thresholds[i])]
        assert (p.sensitivity, 1 - p.specificity) == pytest.approx((tpr[i], fpr[i]), abs=1e-12)
        assert p.tp + p.fn == truths.sum() and p.fp + p.tn == size - truths.sum()
        assert p.tp == int(((scores >= p.threshold) & (truths == 1)).sum())


def test_operating_points_mark_the_current_threshold_and_take_a_grid() -> None:
    points = operating_points([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1], thresholds=[0.0, 0.5, 1.0], current=0.45)
    assert [p.threshold for p in points] == [0.0, 0.45, 0.5, 1.0]
    [current] = [p for p in points if p.current]
    assert (current.threshold, current.tp, current.fp, current.tn, current.fn) == (0.45, 2, 0, 2, 0)
    assert points[-1].sensitivity == 0.0 and points[-1].specificity == 1.0


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31), size=st.integers(1, 60))
def test_operating_points_keep_the_calls_made_anyway(seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    scores, truths, anyway = np.round(rng.random(size), 2), rng.integers(0, 2, size), rng.random(size) < 0.3
    for p in operating_points(scores, truths, called_anyway=anyway, current=0.5):
        called = (scores >= p.threshold) | anyway
        assert (p.tp, p.fp, p.tn, p.fn) == (int((called & (truths == 1)).sum()), int((called & (truths == 0)).sum()),
                                            int((~called & (truths == 0)).sum()), int((~called & (truths == 1)).sum()))


def test_calibration_deciles_count_every_score_once() -> None:
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.random(300), [0.0, 0.1, 0.9999, 1.0]])
    truths = (rng.random(len(scores)) < scores).astype(int)
    bins = calibration_deciles(scores, truths)
    assert [(b.low, b.high) for b in bins] == [(k / 10, (k + 1) / 10) for k in range(10)]
    assert sum(b.n for b in bins) == len(scores)
    for k, b in enumerate(bins):
        inside = (np.floor(scores * 10).clip(0, 9) == k)
        assert b.n == inside.sum() and b.n_present == truths[inside].sum()
        assert b.mean_predicted == pytest.approx(scores[inside].mean())
        assert b.observed_ci == pytest.approx(proportion_confint(b.n_present, b.n, method="wilson"))
    assert bins[1].low <= 0.1 < bins[1].high and bins[9].n >= 2  # 0.1 in the second bin, 1.0 in the last
    assert calibration_deciles([], [])[0].observed_rate is None


# ------------------------------------------------------------------ the store's rows, on SQLite and PostgreSQL

@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    url = (f"sqlite:///{tmp_path / 'ihd.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    database = open_database(url)
    yield database
    database.close()


def _analyse(db: Database, study: str, series: str, p_any: float, at: datetime, threshold: float = 0.5) -> None:
    db.record_instance(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=f"{series}.1",
                       sop_class_uid=CT, path="/spool/x.dcm", size=1, sha256=series, accession_number="A" + study[-1],
                       received_at=at)
    db.set_series_state(series, "analyzing")
    probabilities = dict.fromkeys(CLASSES, 0.1) | {"any": p_any}
    db.finish_analysis(series, model_name="m", model_version="1", probabilities=probabilities,
                       positive_classes=[c for c, p in probabilities.items() if p >= threshold],
                       thresholds=dict.fromkeys(CLASSES, threshold), n_slices=1, objects=[], destinations=[],
                       now=at + timedelta(seconds=30))


def test_a_study_result_is_its_latest_analysis_and_reads_supersede(db: Database) -> None:
    t0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    _analyse(db, "1.9.1", "1.9.1.1", 0.9, t0)
    _analyse(db, "1.9.1", "1.9.1.2", 0.2, t0 + timedelta(hours=1))  # a later series of the same study
    _analyse(db, "1.9.2", "1.9.2.1", 0.7, t0 + timedelta(days=2), threshold=0.8)
    results = db.performance_results()
    assert [(r.series_instance_uid, r.probabilities["any"], sorted(r.positives)) for r in results] == [
        ("1.9.1.2", 0.2, []), ("1.9.2.1", 0.7, [])]
    assert results[1].thresholds["any"] == 0.8 and results[0].delivered == t0 + timedelta(hours=1, seconds=30)
    assert [r.study_instance_uid for r in db.performance_results(since=t0 + timedelta(days=1))] == ["1.9.2"]
    assert [r.study_instance_uid for r in db.performance_results(until=t0 + timedelta(days=1))] == ["1.9.1"]

    db.add_reads([NewRead("1.9.1", "any", "present", "Dr A", t0)], source="console", entered_by="alice")
    db.add_reads([NewRead("1.9.1", "any", "absent", "Dr B"), NewRead("1.9.2", "any", "not_assessed")],
                 source="hl7", entered_by=None)
    current = db.current_reads()
    assert {u: {f: r.value for f, r in v.items()} for u, v in current.items()} == {
        "1.9.1": {"any": "absent"}, "1.9.2": {"any": "not_assessed"}}
    history = db.read_history("1.9.1")
    assert [(r.value, r.current, r.reader, r.source) for r in history] == [
        ("absent", True, "Dr B", "hl7"), ("present", False, "Dr A", "console")]
    assert history[1].superseded_by == history[0].id and history[1].read_at == t0
    assert db.read_counts() == {"absent": 1, "not_assessed": 1}

    report = local_performance(db)
    any_ = report.classes["any"]
    assert (any_.tn, any_.n_read, any_.n_not_assessed, any_.n_unread) == (1, 1, 1, 0)
    assert any_.thresholds_used == [0.5] and any_.threshold == 0.8  # the latest result's
    assert report.classes["subdural"].n_unread == 2 and report.n_read_studies == 2


# ------------------------------------------------------------------ a cohort through a running node

def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ihd_node", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def in_process(capsys: pytest.CaptureFixture[str], *args: str, status: int = 0) -> str:
    """The CLI through its main() in this process (torch is loaded already): stdout, or stderr on failure."""
    capsys.readouterr()
    assert main(list(args)) == status
    out, err = capsys.readouterr()
    return out if status == 0 else err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return run_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def imported(cohort: Cohort) -> dict[str, object]:
    """The truth imported in two files: the first has one wrong read, the second corrects it."""
    uids = list(cohort.truth)
    unread = uids[-2:]  # no read at all (two positives: "any" keeps its 12 negatives)
    not_assessed = [(uids[2], "subdural"), (uids[30], "any"), (uids[15], "epidural")]
    by_accession = uids[4:10]
    rows = truth_rows(cohort, unread=unread, not_assessed=not_assessed, by_accession=by_accession)
    wrong = next(r for r in rows if r.get("study_instance_uid") == uids[12] and r["finding"] == "intraventricular")
    correct = dict(wrong)
    wrong["present"] = "0" if correct["present"] == "1" else "1"
    first = write_csv(cohort.root / "reads.csv", rows)
    done = cli("labels", "import", str(first), "--config", str(cohort.config_path))
    assert f"imported {len(rows)} reads of {len(uids) - 2} studies" in done.stdout
    second = write_csv(cohort.root / "correction.csv", [correct], newline="\r\n")
    done = cli("labels", "import", str(second), "--config", str(cohort.config_path))
    assert "imported 1 read of 1 study; 1 replaced an earlier read" in done.stdout
    return {"unread": set(unread), "not_assessed": set(not_assessed), "corrected": uids[12]}


def test_the_cohort_was_analysed_and_delivered(cohort: Cohort) -> None:
    assert len(cohort.truth) >= 40
    assert set(cohort.states.values()) == {"delivered"}, cohort.states
    for c in CLASSES:  # positives and negatives of every class
        n_pos = sum(c in t for t in cohort.truth.values())
        assert 10 <= n_pos <= len(cohort.truth) - 10, (c, n_pos)
    rows, _ = _database_rows(cohort)
    for c in CLASSES:  # the node called every class positive in some studies and negative in others
        calls = [c in a.positives() for a in rows.values()]
        assert 0 < sum(calls) < len(calls), (c, sum(calls))
    print(f"cohort of {len(cohort.truth)} studies through the node in {cohort.seconds:.1f} s")


def _database_rows(cohort: Cohort) -> tuple[dict[str, Analysis], dict[str, float]]:
    """Each study's analysis and time to result, straight from the tables (one series and one analysis per
    study here)."""
    db = Database(cohort.database_url, create=False)
    with db.read_session() as s:
        rows = s.execute(select(Study.study_instance_uid, Analysis)
                         .join(Series, Series.study_id == Study.id).join(Analysis, Analysis.series_id == Series.id))
        found: dict[str, list[Analysis]] = {}
        for uid, a in rows:
            found.setdefault(uid, []).append(a)
        times = {uid: (delivered - first).total_seconds() for uid, first, delivered in s.execute(
            select(Study.study_instance_uid, Series.first_received, Series.delivered)
            .join(Series, Series.study_id == Study.id))}
    db.close()
    assert all(len(v) == 1 for v in found.values())
    return {uid: v[0] for uid, v in found.items()}, times


def test_performance_json_matches_the_database_the_truth_and_the_references(cohort: Cohort, imported: dict) -> None:
    report = json.loads(cli("performance", "--json", "--config", str(cohort.config_path)).stdout)
    rows, times = _database_rows(cohort)
    assert report["n_results"] == len(cohort.truth) == len(rows)
    assert report["n_read_studies"] == len(cohort.truth) - len(imported["unread"])
    assert report["models"] == ["tiny-random 0"]
    seconds = list(times.values())
    assert report["time_to_result"] == {"p50_seconds": pytest.approx(np.percentile(seconds, 50)),
                                        "p90_seconds": pytest.approx(np.percentile(seconds, 90)), "n": len(seconds)}
    for c in CLASSES:
        got = report["classes"][c]
        scores, truths, calls, anyway = [], [], [], []
        for uid, present in cohort.truth.items():
            if uid in imported["unread"] or (uid, c) in imported["not_assessed"]:
                continue
            a = rows[uid]
            by_subtype = c == "any" and bool(set(a.positives()) - {"any"})  # positive_mask's rule
            assert (c in a.positives()) == (a.probabilities()[c] >= json.loads(a.thresholds)[c] or by_subtype)
            scores.append(a.probabilities()[c])
            truths.append(int(c in present))
            calls.append(c in a.positives())
            anyway.append(by_subtype)
        t, k = np.array(truths), np.array(calls)
        tp, fp = int((k & (t == 1)).sum()), int((k & (t == 0)).sum())
        fn, tn = int((~k & (t == 1)).sum()), int((~k & (t == 0)).sum())
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn), c
        assert got["n_unread"] == len(imported["unread"])
        assert got["n_not_assessed"] == sum(1 for _, f in imported["not_assessed"] if f == c)
        assert got["n_read"] == len(truths) and got["n_present"] == t.sum()
        for name, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                               ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
            if den == 0:
                assert got[name] is None and got[f"{name}_ci"] is None
                continue
            assert got[name] == pytest.approx(num / den, abs=1e-12), (c, name)
            assert got[f"{name}_ci"] == pytest.approx(list(proportion_confint(num, den, method="wilson")),
                                                      abs=1e-12), (c, name)
        if min(t.sum(), len(t) - t.sum()) >= AUC_MIN_CASES:
            assert got["auc"] == pytest.approx(roc_auc_score(truths, scores), abs=1e-12), c
            assert got["auc_ci"][0] <= got["auc"] <= got["auc_ci"][1]
        else:
            assert got["auc"] is None and got["auc_ci"] is None, c
        assert got["few_reads"] == (t.sum() < MIN_READS or (len(t) - t.sum()) < MIN_READS
                                    or got["sensitivity_ci"][1] - got["sensitivity_ci"][0] > 0.3
                                    or got["specificity_ci"][1] - got["specificity_ci"][0] > 0.3)
        assert got["few_reads"] == bool(got["few_reads_reason"])
        assert sum(b["n"] for b in got["calibration"]) == len(truths)
        # The ROC curve of the calls each threshold makes ("any" called by a subtype stays called: score 2).
        fpr, tpr, thr = roc_curve(truths, np.where(anyway, 2.0, scores), drop_intermediate=False)
        points = {p["threshold"]: p for p in got["operating_points"]}
        for i in range(len(thr)):
            if thr[i] <= 1.0:
                point = points[thr[i]]
                assert (point["sensitivity"], 1 - point["specificity"]) == pytest.approx((tpr[i], fpr[i]))
        [current] = [p for p in got["operating_points"] if p["current"]]
        assert current["threshold"] == got["threshold"] == json.loads(a.thresholds)[c]  # the node's threshold
        assert (current["tp"], current["fp"], current["tn"], current["fn"]) == (tp, fp, tn, fn)
        assert got["card"]["source"].startswith("model card") and 0.5 < got["card"]["auc"] <= 1.0
    assert report["classes"]["epidural"]["few_reads"]  # 12 present reads
    assert "only" in report["classes"]["epidural"]["few_reads_reason"]


def test_the_later_read_is_current_and_both_are_in_the_history(cohort: Cohort, imported: dict,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    uid = imported["corrected"]
    done = json.loads(in_process(capsys, "labels", "list", "--study", uid, "--json", "--config",
                                 str(cohort.config_path)))
    iv = [r for r in done["reads"] if r["finding"] == "intraventricular"]
    assert len(iv) == 2 and [r["current"] for r in iv] == [True, False]  # newest first
    assert iv[1]["superseded_by"] == iv[0]["id"] and iv[0]["value"] != iv[1]["value"]
    assert iv[0]["value"] == ("present" if "intraventricular" in cohort.truth[uid] else "absent")
    assert iv[0]["source"] == "csv" and iv[0]["reader"] == "Dr Reader" and iv[0]["read_at"].startswith("2026-11-30")
    text = in_process(capsys, "labels", "list", "--study", uid, "--config", str(cohort.config_path))
    assert f"replaced by {iv[0]['id']}" in text


def test_performance_text_puts_each_figure_with_its_interval_and_says_few_reads(
        cohort: Cohort, imported: dict, capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(in_process(capsys, "performance", "--json", "--config", str(cohort.config_path)))
    text = in_process(capsys, "performance", "--config", str(cohort.config_path))
    assert "NOT FOR DIAGNOSTIC USE" in text
    epidural = text.split("\nepidural (")[1].split("\nintraparenchymal (")[0]
    e = report["classes"]["epidural"]
    sens = f"{e['sensitivity']:.2f} ({e['sensitivity_ci'][0]:.2f}-{e['sensitivity_ci'][1]:.2f})"
    [line] = [ln for ln in epidural.splitlines() if ln.strip().startswith("sensitivity")]
    assert sens in line and f"FEW READS: {e['n_present']} present" in line
    assert f"TP {e['tp']}  FP {e['fp']}  TN {e['tn']}  FN {e['fn']}" in epidural
    assert f"Few reads: {e['few_reads_reason']}." in " ".join(epidural.split())  # wrapped at 100 columns
    assert max(len(ln) for ln in text.splitlines()) <= 100
    table = in_process(capsys, "performance", "--operating-points", "--finding", "any", "--config",
                       str(cohort.config_path))
    [marked] = [ln for ln in table.splitlines() if ln.strip().startswith("* ")]
    a = report["classes"]["any"]
    assert marked.split() == ["*", f"{a['threshold']:.6g}", f"{a['sensitivity']:.3f}", f"{a['specificity']:.3f}",
                              str(a["tp"]), str(a["fp"]), str(a["tn"]), str(a["fn"])]
    assert "subdural" not in table


def test_a_period_without_results_has_no_figures(cohort: Cohort, imported: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(in_process(capsys, "performance", "--json", "--until", "2000-01-01", "--config",
                                   str(cohort.config_path)))
    assert report["n_results"] == 0
    any_ = report["classes"]["any"]
    assert (any_["tp"], any_["sensitivity"], any_["sensitivity_ci"], any_["auc"]) == (0, None, None, None)
    assert any_["few_reads"]
    err = in_process(capsys, "performance", "--since", "2026-12-01", "--until", "2026-11-01", "--config",
                     str(cohort.config_path), status=2)
    assert "is not before --until" in err
