"""Where people look (issue 19): a phantom cohort with known truth analysed by a running node, its truth
imported with `ihd-node labels import`, then the console's /performance page and the validation report in
headless Chromium (screenshots in the test's output folder, or IHD_NODE_SCREENSHOTS=DIR), /metrics' gauges
parsed with prometheus_client's parser, and the audited read form. Every figure shown is checked against
local_performance on the same database; the charts must have drawn elements. One node for the module.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import webclient
from cohort import Cohort, cohort_plan, run_cohort, truth_rows, write_csv
from loopback import node_config, running_node, tiny_predictor
from prometheus_client.parser import text_string_to_metric_families
from waiting import poll_until

from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main
from ihd_node.monitoring import local_performance
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import free_port
from ihd_node.store import Database
from ihd_node.web.performance_view import interval, pct
from ihd_node.web.server import hash_password

USER, PASSWORD = "reader1", "a long console password"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
UNREAD = 2  # studies left without a read


@dataclass
class Site:
    cohort: Cohort
    node: Node
    base: str
    db_path: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("performance")
    cohort = run_cohort(root / "cohort", plan=cohort_plan(n_negative=4, n_positive=8), first_seed=191000,
                        node_sections={"monitoring": {"reference_results": 6, "min_results": 6}})
    rows = truth_rows(cohort, unread=list(cohort.truth)[:UNREAD], not_assessed=[(list(cohort.truth)[-1], "epidural")])
    assert main(["labels", "import", str(write_csv(root / "reads.csv", rows)), "--config",
                 str(cohort.config_path)]) == 0
    (root / "users").write_text(f"{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
    # The same node state, started again with its console behind a users file.
    config = node_config(root / "cohort" / "node", [], web={"port": free_port(),
                                                            "auth": {"users_file": str(root / "users")}},
                         monitoring={"reference_results": 6, "min_results": 6})
    assert config.database_url == cohort.database_url
    with running_node(config, tiny_predictor()) as node:
        yield Site(cohort, node, f"http://127.0.0.1:{node.web.port}", Path(config.storage.dir) / "ihd.sqlite")


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return webclient.basic(user, password)


def http(url: str, auth: str | None = None, data: bytes | None = None) -> tuple[int, str, dict]:
    return webclient.http(url, auth=auth, data=data, redirects=False, timeout=60)


def expected(site: Site):
    db = Database(site.cohort.database_url, create=False)
    try:
        return local_performance(db)
    finally:
        db.close()


def shots_dir(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("IHD_NODE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def check_figures_in_page(page, perf) -> None:
    """Every class' figures and intervals appear as text, and every chart drew something."""
    for c in CLASSES:
        cp = perf.classes[c]
        section = page.locator(f'section.finding[data-finding="{c}"]')
        sens = section.locator('tr[data-figure="sensitivity"]')
        assert sens.locator("td.value").inner_text() == pct(cp.sensitivity)
        assert sens.locator("td.ci").inner_text() == interval(cp.sensitivity_ci)
        spec = section.locator('tr[data-figure="specificity"]')
        assert spec.locator("td.value").inner_text() == pct(cp.specificity)
        assert spec.locator("td.ci").inner_text() == interval(cp.specificity_ci)
        assert section.locator('tr[data-figure="ppv"] td.ci').inner_text() == interval(cp.ppv_ci)
        assert section.locator('tr[data-figure="npv"] td.ci').inner_text() == interval(cp.npv_ci)
        assert f"{cp.n_unread} results without a read" in section.locator("span.unread").inner_text()
        if cp.few_reads:
            assert "Few reads" in section.locator("p.few-reads").inner_text()
            assert cp.few_reads_reason in section.locator("p.few-reads").inner_text()
        else:
            assert section.locator("p.few-reads").count() == 0
        assert section.locator("svg.chart").count() == 3
        assert section.locator("svg.chart path.series").count() >= 2  # the ROC curve and the threshold steps
        assert section.locator("svg.chart line.diagonal").count() == 2  # calibration and ROC
    assert page.locator("svg.chart circle.point").count() > 0
    assert page.locator("figure.panel svg rect.bar").count() > 0
    assert "NOT FOR DIAGNOSTIC USE" in page.locator("body").inner_text()


def test_metrics_carry_the_local_figures_and_drift(site: Site) -> None:
    assert http(site.base + "/metrics")[0] == 401
    status, body, _ = http(site.base + "/metrics", basic())
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    perf = expected(site)
    for c in CLASSES:
        cp = perf.classes[c]
        key = (("finding", c),)
        for figure in ("sensitivity", "specificity", "ppv", "npv"):
            value, ci = getattr(cp, figure), getattr(cp, f"{figure}_ci")
            if value is None:
                assert (f"ihd_node_local_{figure}", key) not in samples
            else:
                assert samples[(f"ihd_node_local_{figure}", key)] == pytest.approx(value)
                assert samples[(f"ihd_node_local_{figure}_low", key)] == pytest.approx(ci[0])
                assert samples[(f"ihd_node_local_{figure}_high", key)] == pytest.approx(ci[1])
        assert samples[("ihd_node_local_n_unread", key)] == cp.n_unread
        assert samples[("ihd_node_local_few_reads", key)] == (1 if cp.few_reads else 0)
    assert samples[("ihd_node_local_n_unread", (("finding", "any"),))] == UNREAD
    assert samples[("ihd_node_local_sensitivity", (("finding", "any"),))] == pytest.approx(
        perf.classes["any"].sensitivity)
    assert {("ihd_node_drift_psi", (("feature", f),)) for f in ("input_kernel", "score_any")} <= set(samples)
    # The node's first drift check ran at its start (the scrape may come before it booked its episode).
    assert samples[("ihd_node_drift_episode_open", ())] in (0, 1)
    assert poll_until(lambda: site.node.drift.last is not None, 30, every=0.1)
    open_now = site.node.db.open_drift_episode() is not None
    assert open_now == (site.node.drift.last.status == "alert")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(http(site.base + "/metrics", basic())[1])
               for s in family.samples}
    assert samples[("ihd_node_drift_episode_open", ())] == (1 if open_now else 0)
    report = site.node.drift.last
    for f in report.features:
        assert samples[("ihd_node_drift_psi", (("feature", f.name),))] == pytest.approx(f.psi)
    assert ("ihd_node_positivity_rate", (("window", "current"),)) in samples


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not installed")
def test_performance_page_and_report_in_a_real_browser(site: Site, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) drives the browser")
    shots = shots_dir(tmp_path)
    perf = expected(site)
    report = tmp_path / "validation.html"
    pdf = tmp_path / "validation.pdf"
    assert main(["validation-report", "--config", str(site.cohort.config_path), "--out", str(report),
                 "--pdf", str(pdf)]) == 0
    html = report.read_text()
    assert "<script" not in html and 'src="http' not in html and "<link" not in html  # self-contained
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.goto(site.base + "/performance")
            assert page.locator("td.n-results").inner_text() == str(perf.n_results)
            check_figures_in_page(page, perf)
            page.screenshot(path=str(shots / "performance.png"), full_page=True)

            offline = browser.new_context(offline=True, viewport={"width": 1100, "height": 900}).new_page()
            offline.goto(report.as_uri())
            assert offline.locator("td.n-read").inner_text() == str(perf.n_read_studies)
            check_figures_in_page(offline, perf)
            offline.screenshot(path=str(shots / "validation-report.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "performance.png").stat().st_size > 10_000


def test_read_form_is_blind_audited_and_needs_a_user(site: Site) -> None:
    study = next(iter(site.cohort.truth))  # one of the unread studies
    quoted = urllib.parse.quote(study, safe="")
    status, form, _ = http(f"{site.base}/read/{quoted}", basic())
    assert status == 200 and 'name="finding_any"' in form
    assert "checked" not in form  # nothing pre-filled
    assert "Possible intracranial hemorrhage" not in form and "No hemorrhage found" not in form  # no model call
    data = urllib.parse.urlencode({"study": study, "finding_any": "present", "finding_subdural": "present",
                                   "finding_epidural": "absent", "reader": "Dr Second"}).encode()
    # Without a console user nothing is saved.
    assert http(f"{site.base}/actions/read", data=data)[0] == 401
    assert http(f"{site.base}/actions/read", basic(password="wrong"), data=data)[0] == 401
    with sqlite3.connect(f"file:{site.db_path}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM reads WHERE study_instance_uid = ?", (study,)).fetchone()[0] == 0
    status, _, headers = http(f"{site.base}/actions/read", basic(), data=data)
    assert status == 303 and headers["Location"].startswith(f"/study/{quoted}")
    # Then a correction: the later read replaces the earlier one; both stay in the history.
    again = urllib.parse.urlencode({"study": study, "finding_subdural": "absent", "reader": "Dr Second"}).encode()
    assert http(f"{site.base}/actions/read", basic(), data=again)[0] == 303
    status, page, _ = http(f"{site.base}/study/{quoted}", basic())
    assert status == 200 and 'id="reads"' in page
    with sqlite3.connect(f"file:{site.db_path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT finding, value, reader, entered_by, source, current FROM reads "
                            "WHERE study_instance_uid = ? ORDER BY id", (study,)).fetchall()
        audits = conn.execute("SELECT message FROM events WHERE kind = 'audit' AND study_instance_uid = ?",
                              (study,)).fetchall()
    assert rows == [("any", "present", "Dr Second", USER, "console", 1),
                    ("epidural", "absent", "Dr Second", USER, "console", 1),
                    ("subdural", "present", "Dr Second", USER, "console", 0),
                    ("subdural", "absent", "Dr Second", USER, "console", 1)]
    assert len(audits) == 2 and all(f"read entered by {USER}" in m for (m,) in audits)
    assert page.count('class="entered-by">' + USER) == 4  # the history names the console user


def test_validation_report_refuses_bad_arguments_with_the_fix(site: Site, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = str(site.cohort.config_path)
    assert main(["validation-report", "--config", config, "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["validation-report", "--config", config, "--out", str(tmp_path / "r.html"),
                 "--since", "2026-12-01", "--until", "2026-11-01"]) == 2
    assert "swap them" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    # A period without results still writes a report that says so.
    assert main(["validation-report", "--config", config, "--out", str(tmp_path / "empty.html"),
                 "--until", "2000-01-01"]) == 0
    html = (tmp_path / "empty.html").read_text()
    assert 'class="n-results">0<' in html and "no read results yet" in html and "NOT FOR DIAGNOSTIC USE" in html
