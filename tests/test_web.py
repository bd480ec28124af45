"""The node's web side (issue 12): /healthz, /metrics and the console, on a node that has received a positive
and a negative study over real C-STORE associations, analysed them with the shipped default model and sent
the results to a MiniPACS. The node listens beyond loopback (0.0.0.0) with a users file and a token, as an
admin would set it up; one node for the whole module.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import webclient
from prometheus_client.parser import text_string_to_metric_families
from waiting import poll_until
from webclient import http

from ihd_node.commands.demo import STUDIES
from ihd_node.config import default_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_files
from ihd_node.sim.phantom import make_series, write_series
from ihd_node.web.server import hash_password

USER, PASSWORD, TOKEN = "admin", "correct horse battery", "t0ken-for-prometheus"


@dataclass
class Site:
    node: Node
    pacs: MiniPACS
    base: str
    db_path: Path
    studies: dict[str, tuple[str, str, list[str]]]  # label -> (study UID, series UID, truth)


def wait_until(condition, seconds: float = 60.0) -> bool:
    return poll_until(condition, seconds, every=0.1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("web")
    (root / "users").write_text(f"# console users\n{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
    (root / "token").write_text(TOKEN + "\n")
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        config = default_config(
            root / "node", node={"ae_title": "IHD_AI", "host": "127.0.0.1", "port": free_port()},
            storage={"min_free_mb": 0}, model={"checkpoint": "default", "device": "cpu"},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            web={"host": "0.0.0.0", "port": free_port(),
                 "auth": {"users_file": str(root / "users"), "token_file": str(root / "token")}})
        node = Node(config).start()
        try:
            studies = {}
            for label, subtypes, seed in STUDIES:  # the demo's studies: the default model gets both right
                series = make_series(seed, subtypes=subtypes, n_slices=28, slice_spacing=5.5)
                files = write_series(series, root / "studies" / label.replace(" ", "-"))
                assert all(s == 0 for s in send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI"))
                studies[label] = (series.study_instance_uid, series.series_instance_uid, subtypes)
            db_path = Path(config.storage.dir) / "ihd.sqlite"

            def delivered() -> bool:
                with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
                    return conn.execute("SELECT count(*) FROM series WHERE state = 'delivered'").fetchone()[0] == 2
            assert wait_until(delivered, 120)
            yield Site(node, pacs, f"http://127.0.0.1:{node.web.port}", db_path, studies)
        finally:
            node.stop()


def get(url: str, auth: str | None = None, method: str = "GET", data: bytes | None = None,
        headers: dict | None = None) -> tuple[int, str, dict]:
    return http(url, auth=auth, method=method, data=data, headers=headers)


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return webclient.basic(user, password)


def sql(site: Site, query: str) -> int:
    with sqlite3.connect(f"file:{site.db_path}?mode=ro", uri=True) as conn:
        return conn.execute(query).fetchone()[0]


def test_healthz_is_public_and_says_ready(site: Site) -> None:
    status, body, _ = get(site.base + "/healthz")
    assert status == 200, body
    assert '"status": "ready"' in body
    for check in ("database", "spool_disk", "model", "threads"):
        assert f'"{check}"' in body
    assert get(site.base + "/healthz/live")[0] == 200


def test_metrics_need_auth_parse_and_match_the_database(site: Site) -> None:
    assert get(site.base + "/metrics")[0] == 401
    assert get(site.base + "/metrics", "Bearer wrong")[0] == 401
    assert get(site.base + "/metrics", basic(password="wrong"))[0] == 401
    status, body, _ = get(site.base + "/metrics", f"Bearer {TOKEN}")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("ihd_instances_received_total", ())] == sql(site, "SELECT count(*) FROM instances") == 56
    assert samples[("ihd_series", (("state", "delivered"),))] == 2
    positive = sql(site, "SELECT count(*) FROM analyses WHERE positive_classes != ''")
    assert positive == 1  # the default model is right about both studies
    assert samples[("ihd_analyses_total", (("result", "positive"),))] == positive
    assert samples[("ihd_analyses_total", (("result", "negative"),))] == 1
    assert samples[("ihd_time_to_result_seconds_count", ())] == 2
    assert samples[("ihd_model_seconds_count", ())] == sql(
        site, "SELECT count(*) FROM analyses WHERE inference_seconds IS NOT NULL")
    assert samples[("ihd_model_seconds_sum", ())] == pytest.approx(
        sql(site, "SELECT sum(inference_seconds) FROM analyses"))
    failures = sum(v for (name, _), v in samples.items() if name == "ihd_delivery_failures_total")
    assert failures == sql(site, "SELECT count(*) FROM delivery_attempts WHERE outcome != 'sent'")
    assert samples[("ihd_deliveries", (("status", "sent"),))] == sql(
        site, "SELECT count(*) FROM deliveries WHERE status = 'sent'")
    assert samples[("ihd_model_loaded", ())] == 1
    assert samples[("ihd_queue_depth", ())] == 0
    # The same figures for a basic-auth user.
    assert get(site.base + "/metrics", basic())[0] == 200


def test_console_pages_over_http(site: Site) -> None:
    """Plain HTTP checks of what the browser test looks at, plus what a browser cannot show easily."""
    assert get(site.base + "/")[0] == 401  # auth configured: the console needs it
    status, page, _ = get(site.base + "/", basic())
    assert status == 200, page
    pos_study, pos_series, _ = site.studies["with hemorrhage"]
    neg_study, neg_series, _ = site.studies["without hemorrhage"]
    assert pos_series in page and neg_series in page
    status, page, _ = get(site.base + "/?filter=positive&hours=24", basic())
    assert pos_series in page and neg_series not in page
    status, page, _ = get(site.base + "/?filter=failed", basic())
    assert pos_series not in page and neg_series not in page
    status, page, _ = get(f"{site.base}/study/{pos_study}", basic())
    assert status == 200 and "Possible intracranial hemorrhage" in page and "/thumb/" in page
    status, png, headers = get(f"{site.base}/thumb/{pos_series}.png", basic())
    assert status == 200 and headers["Content-Type"] == "image/png" and png[1:4] == "PNG"
    # The report's summary capture (instance 1) exists for negative series too.
    assert get(f"{site.base}/thumb/{neg_series}.png", basic())[0] == 200
    assert get(f"{site.base}/thumb/1.2.3.png", basic())[0] == 404
    assert get(f"{site.base}/study/1.2.3.4", basic())[0] == 404
    # A result of a series that went out before all its images may have arrived says so, in those words.
    assert "INCOMPLETE SERIES" not in get(f"{site.base}/study/{neg_study}", basic())[1]
    why = "coverage: top slice at 80.0 mm does not reach the vertex"
    site.node.db.record_completion(neg_series, rule="max_wait", n_instances=28, evidence="-", preliminary=why)
    page = get(f"{site.base}/study/{neg_study}", basic())[1]
    assert "INCOMPLETE SERIES</span>: analysed before all images may have arrived" in page and why in page
    site.node.db.record_completion(neg_series, rule="quiet", n_instances=28, evidence="-", preliminary=None)
    assert "INCOMPLETE SERIES" not in get(f"{site.base}/study/{neg_study}", basic())[1]


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_actions_refused_without_auth_beyond_loopback(site: Site) -> None:
    _, neg_series, _ = site.studies["without hemorrhage"]
    form = f"series={neg_series}".encode()
    for path in ("/actions/reanalyse", "/actions/resend"):
        status, _, headers = get(site.base + path, method="POST", data=form)
        assert status == 401 and "Basic" in headers["WWW-Authenticate"]
        assert get(site.base + path, basic(password="wrong"), method="POST", data=form)[0] == 401
        # A logged-in browser tricked by another site: refused too.
        assert get(site.base + path, basic(), method="POST", data=form,
                   headers={"Origin": "http://evil.example"})[0] == 403
    assert sql(site, "SELECT count(*) FROM analyses") == 2  # nothing happened
    assert sql(site, "SELECT count(*) FROM events WHERE kind = 'audit'") == 0


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is not installed")
def test_console_in_a_real_browser(site: Site, tmp_path: Path) -> None:
    """Chromium shows both studies with findings and the thumbnail; the phone layout; an audited action.
    IHD_NODE_SCREENSHOTS=DIR keeps the screenshots (the README's come from here)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) drives the browser")
    shots = Path(os.environ.get("IHD_NODE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    pos_study, pos_series, _ = site.studies["with hemorrhage"]
    neg_study, neg_series, _ = site.studies["without hemorrhage"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1200, "height": 800})
            page = context.new_page()
            page.goto(site.base + "/")
            positive = page.locator(f'tr.row[data-series="{pos_series}"]')
            negative = page.locator(f'tr.row[data-series="{neg_series}"]')
            sync_api.expect(positive).to_contain_text("intraparenchymal")
            sync_api.expect(positive).to_contain_text("delivered")
            sync_api.expect(negative).to_contain_text("no hemorrhage")
            sync_api.expect(page.locator("#health")).to_contain_text("ready")
            page.screenshot(path=str(shots / "console.png"), full_page=True)

            page.goto(f"{site.base}/study/{pos_study}")
            sync_api.expect(page.locator("table.findings")).to_contain_text("Intraparenchymal hemorrhage")
            thumb = page.locator("img.thumb")
            sync_api.expect(thumb).to_be_visible()
            assert page.evaluate("document.querySelector('img.thumb').naturalWidth") > 0
            page.screenshot(path=str(shots / "console-study.png"), full_page=True)

            page.goto(f"{site.base}/study/{neg_study}")
            sync_api.expect(page.locator("main")).to_contain_text("No hemorrhage found")
            sync_api.expect(page.locator("img.thumb")).to_be_visible()  # the summary capture of a negative
            page.get_by_role("button", name="Re-analyse").click()
            sync_api.expect(page.locator(".notice")).to_contain_text("queued for re-analysis")

            phone = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                        viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                        is_mobile=True)
            small = phone.new_page()
            small.goto(site.base + "/?filter=positive")
            sync_api.expect(small.locator(f'tr.row[data-series="{pos_series}"]')).to_be_visible()
            # Readable without zooming: the page is no wider than the phone (tables scroll inside their box).
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            small.screenshot(path=str(shots / "console-phone.png"))
        finally:
            browser.close()
    assert wait_until(lambda: sql(site, "SELECT max(a.revision) FROM analyses a JOIN series s ON s.id = a.series_id "
                                        f"WHERE s.series_instance_uid = '{neg_series}'") == 2, 60)
    assert sql(site, "SELECT count(*) FROM events WHERE kind = 'audit' AND message LIKE 're-analysis by admin%'") == 1
    assert (shots / "console.png").stat().st_size > 1000


def test_console_beyond_loopback_needs_auth(tmp_path: Path) -> None:
    from ihd_node.config import ConfigError

    with pytest.raises(ConfigError, match="auth is not set"):
        default_config(tmp_path, web={"host": "0.0.0.0"})
    assert default_config(tmp_path, web={"host": "127.0.0.1"}).web.loopback
    assert default_config(tmp_path, web={"host": "0.0.0.0", "enabled": False}).web.enabled is False


def test_web_user_command_writes_a_checkable_hash(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ihd_node.web.auth import check_password, read_users

    users = tmp_path / "users"
    for password in ("first password", "second password"):  # the second replaces the first
        done = subprocess.run([sys.executable, "-m", "ihd_node", "web-user", str(users), "alice"],
                              input=password + "\n", text=True, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert users.stat().st_mode & 0o777 == 0o600
    stored = read_users(users)
    assert list(stored) == ["alice"] and check_password(stored["alice"].stored, "second password")
    assert not check_password(stored["alice"].stored, "first password")
    assert stored["alice"].role == "viewer"  # a new user without --role: the least role
    short = subprocess.run([sys.executable, "-m", "ihd_node", "web-user", str(users), "bob"], input="short\n",
                           text=True, capture_output=True, timeout=60)
    assert short.returncode == 2 and "shorter than 8" in short.stderr
