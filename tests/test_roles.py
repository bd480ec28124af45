"""Console roles (issue 22): a viewer may look but not act (403 naming the role, nothing changed in the
database, no buttons), an operator may re-send, re-analyse, retract and enter a read (each audit event naming
the user and role), an admin sees the users and configuration page; the bearer token's role; every log-in
attempt reaches WebServer.on_login and failures the event log; users-file lines from before roles; the
web-user command. One node, with one delivered series, for the module.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from heads import full_head
from loopback import destination, node_config, running_node, tiny_predictor, wait_finished
from waiting import poll_until
from webclient import basic, bearer, http

from ihd_node.commands.cli import main
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_datasets
from ihd_node.store import Event, Read
from ihd_node.web.admin import masked
from ihd_node.web.auth import LoginAttempt, check_password, hash_password, read_users

PASSWORDS = {"vera": "viewer password", "olga": "operator password", "adam": "admin password",
             "old": "legacy password"}
TOKEN = "a-long-token-for-the-scraper"


@dataclass
class Site:
    node: Node
    base: str
    study: str
    series: str
    users: Path
    logins: list[LoginAttempt]


def users_file(path: Path) -> Path:
    quick = {u: hash_password(p, iterations=1000) for u, p in PASSWORDS.items()}
    path.write_text(f"# console users\nvera:viewer:{quick['vera']}\nolga:operator:{quick['olga']}\n"
                    f"adam:admin:{quick['adam']}\nold:{quick['old']}\n")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("roles")
    users = users_file(root / "users")
    (root / "token").write_text(TOKEN + "\n")
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        config = node_config(root / "node", [destination("pacs", "PACS", pacs.port)],
                             series={"quiet_seconds": 0.5, "max_wait_seconds": 20.0},
                             analysis={"max_secondary_captures": 1},
                             web={"port": free_port(), "auth": {"users_file": str(users),
                                                                "token_file": str(root / "token")}})
        with running_node(config, tiny_predictor()) as node:
            logins: list[LoginAttempt] = []
            node.web.on_login = logins.append
            series = full_head(84, n_slices=24, size=64)
            uid = series.series_instance_uid
            assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                 calling_aet="CT1") == [0] * 24
            done = wait_finished(node, uid, 240)  # minutes only on a machine busy with other work
            assert done is not None and done.state == "delivered", done
            yield Site(node, f"http://127.0.0.1:{node.web.port}", series.study_instance_uid, uid, users, logins)


def call(url: str, user: str | None = None, form: dict | None = None, *,
         password: str | None = None, token: str | None = None) -> tuple[int, str]:
    auth = bearer(token) if token else basic(user, password or PASSWORDS[user]) if user else None
    status, text, _ = http(url, auth=auth, form=form, redirects=False)
    return status, text


def audits(node: Node) -> list[str]:
    with node.db.read_session() as s:
        return [e.message for e in s.query(Event).filter(Event.kind == "audit").order_by(Event.id)]


def state(site: Site) -> tuple:
    """What an action would change: the series' state, its analyses, queued deliveries, reads, audit events."""
    db = site.node.db
    with db.read_session() as s:
        reads = s.query(Read).count()
    analysis = db.latest_analysis(site.series)
    return (db.get_series(site.series).state, analysis.revision, analysis.retracted_at, reads, len(audits(site.node)))


def actions(site: Site) -> dict[str, dict[str, str]]:
    return {"/actions/resend": {"series": site.series}, "/actions/reanalyse": {"series": site.series},
            "/actions/retract": {"series": site.series, "reason": "wrong patient"},
            "/actions/read": {"study": site.study, "finding_any": "present", "reader": "dr x"}}


def test_viewer_looks_but_cannot_act(site: Site) -> None:
    before = state(site)
    status, page = call(f"{site.base}/study/{site.study}", "vera")
    assert status == 200 and "signed in as vera (viewer)" in page
    for button in ("Re-send failed deliveries", "Re-analyse", "Retract result", "Enter the radiologist"):
        assert button not in page
    assert "need the operator role; vera is a viewer" in page and "/admin" not in page
    for path, form in actions(site).items():
        status, body = call(site.base + path, "vera", form)
        assert status == 403, (path, body)
        assert "this needs the operator role; vera signed in as viewer" in body and "--role operator" in body
    status, body = call(f"{site.base}/read/{site.study}", "vera")
    assert status == 403 and "operator role" in body
    status, body = call(site.base + "/admin", "vera")
    assert status == 403 and "this needs the admin role" in body
    assert state(site) == before  # nothing changed in the database, no audit event
    # ... but each refusal is in the audit trail: 110113 Use of Restricted Function, failed, naming vera.
    refused = [m for m in site.node.db.audit_messages() if m.event.startswith("console-actions-")
               and 'UserID="vera"' in m.xml and 'EventOutcomeIndicator="4"' in m.xml and m.schema_error is None]
    assert sorted({m.event for m in refused}) == ["console-actions-read", "console-actions-reanalyse",
                                                  "console-actions-resend", "console-actions-retract"], refused
    # The token (a scraper's) has web.auth.token_role, viewer by default: metrics yes, actions no.
    assert call(site.base + "/metrics", token=TOKEN)[0] == 200
    assert call(site.base + "/actions/resend", token=TOKEN, form={"series": site.series})[0] == 403
    assert state(site) == before


def test_operator_acts_and_each_audit_names_the_user_and_role(site: Site) -> None:
    node, uid = site.node, site.series
    status, page = call(f"{site.base}/study/{site.study}", "olga")
    assert status == 200 and "Re-analyse" in page and "Retract result" in page and "Enter the radiologist" in page
    assert "users and configuration" not in page
    assert call(site.base + "/admin", "olga")[0] == 403
    first = len(audits(node))

    assert call(site.base + "/actions/resend", "olga", {"series": uid})[0] == 303
    assert call(site.base + "/actions/reanalyse", "olga", {"series": uid})[0] == 303
    assert poll_until(lambda: node.db.get_series(uid).revision == 2  # a second analysis, delivered
                      and node.db.get_series(uid).state == "delivered", 240)
    status, _ = call(site.base + "/actions/read", "olga", actions(site)["/actions/read"])
    assert status == 303
    with node.db.read_session() as s:
        assert [(r.entered_by, r.value) for r in s.query(Read)] == [("olga", "present")]
    assert call(site.base + "/actions/retract", "olga", actions(site)["/actions/retract"])[0] == 303
    assert node.db.get_series(uid).state == "retracted"
    said = audits(node)[first:]
    assert [m.split(" by ")[0] for m in said] == ["re-send of failed deliveries", "re-analysis", "read entered",
                                                  "retraction"], said
    assert all(" by olga (operator)" in m for m in said), said


def upload(url: str, user: str, name: str, data: bytes, check_only: bool = False) -> tuple[int, str]:
    """POST a file as a browser's form does (multipart/form-data)."""
    boundary = "----ihd-node-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             "Content-Type: text/csv\r\n\r\n".encode() + data + b"\r\n"]
    if check_only:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="check_only"\r\n\r\n1\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, text, _ = http(url, auth=basic(user, PASSWORDS[user]), data=body,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, text


def test_reads_file_import_viewer_refused_operator_imports_audited(site: Site) -> None:
    node, url = site.node, site.base + "/actions/import-reads"

    def reads() -> list[tuple]:
        with node.db.read_session() as s:
            return sorted((r.finding, r.value, r.source, r.entered_by) for r in s.query(Read))

    good = (f"study_instance_uid,finding,present,reader\n{site.study},any,1,Dr Import\n"
            f"{site.study},subdural,1,Dr Import\n").encode()
    before = reads()
    status, body = upload(url, "vera", "reads.csv", good)
    assert status == 403 and "this needs the operator role" in body and reads() == before
    assert any(m.event == "console-actions-import-reads" and 'UserID="vera"' in m.xml
               for m in node.db.audit_messages())
    assert "import reads" not in call(f"{site.base}/", "vera")[1]
    status, page = call(site.base + "/reads/import", "olga")
    assert status == 200 and 'enctype="multipart/form-data"' in page

    status, body = upload(url, "olga", "bad.csv", good + b"1.2.3.4.5,any,1,Dr Import\n")
    assert status == 400 and "nothing imported" in body and "line 4" in body and "unknown study" in body
    status, body = upload(url, "olga", "reads.csv", good, check_only=True)
    assert status == 200 and "are good; nothing imported (check only)" in body
    assert reads() == before

    status, body = upload(url, "olga", "reads.csv", good)
    assert status == 200 and "imported 2 read(s) of 1 study(ies)" in body, body
    assert sorted(set(reads()) - set(before)) == [("any", "present", "csv", "olga"),
                                                  ("subdural", "present", "csv", "olga")]
    assert any(m.startswith("reads import by olga (operator): 2 read(s)") for m in audits(node))
    imported = [m for m in node.db.audit_messages(event="labels-import") if 'UserID="olga"' in m.xml
                and "reads.csv" in m.xml]
    assert len(imported) == 1 and imported[0].schema_error is None


def test_admin_sees_users_roles_and_masked_configuration(site: Site) -> None:
    status, page = call(site.base + "/admin", "adam")
    assert status == 200 and "users and configuration" in page
    for user, role in (("vera", "viewer"), ("olga", "operator"), ("adam", "admin"), ("old", "operator")):
        assert f'<tr data-user="{user}"><td>{user}</td><td class="role">{role}</td>' in page
    assert f"line without a role, read as operator</span>: <code>ihd-node web-user {site.users} old" in page
    assert 'class="token-role">viewer<' in page
    assert 'data-key="web.auth.users_file"' in page and 'data-key="node.ae_title"' in page
    assert "<code>POST /actions/retract</code>" in page
    # Secrets in URLs are masked (a PostgreSQL password, a webhook's secret path, query strings).
    assert masked("database.url", "postgresql+psycopg://ihd:s3cret@db/ihd") == "postgresql+psycopg://ihd:***@db/ihd"
    assert masked("alerts.channels[0].url", "https://hooks.example.org/T0/B0/XyZ") == "https://hooks.example.org/***"
    assert masked("destinations[0].url", "https://ehr.example.org/fhir?key=abc") == "https://ehr.example.org/fhir?***"
    assert masked("web.port", 8112) == 8112


def test_login_attempts_reach_on_login_and_failures_the_event_log(site: Site) -> None:
    site.logins.clear()
    assert call(site.base + "/", "vera", password="not vera's")[0] == 401
    assert call(site.base + "/", "nobody", password="whatever")[0] == 401
    assert call(site.base + "/", token="wrong")[0] == 401
    fails = [a for a in site.logins if not a.success]
    assert [(a.user, a.method, a.reason) for a in fails] == [
        ("vera", "basic", "wrong password"), ("nobody", "basic", "no such user in web.auth.users_file"),
        ("token", "token", "wrong bearer token")]
    assert all(a.address == "127.0.0.1" and a.role is None for a in fails)
    with site.node.db.read_session() as s:
        events = [e.message for e in s.query(Event).filter(Event.kind == "web").order_by(Event.id)][-3:]
    assert "console log-in failed (basic) for vera from 127.0.0.1: wrong password" in events[0]
    assert not any("not vera's" in m or "whatever" in m for m in events)  # no password in the log
    # A credential's first success is one attempt; the next requests with it are not new log-ins.
    site.logins.clear()
    for _ in range(3):
        assert call(site.base + "/", "old")[0] == 200  # the users-file line without a role: operator
    assert site.logins == [LoginAttempt("old", "operator", True, "127.0.0.1", "basic", "signed in")]


def test_old_users_lines_and_check_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    users = users_file(tmp_path / "users")
    lines = read_users(users)
    assert (lines["old"].role, lines["old"].legacy) == ("operator", True)
    assert (lines["vera"].role, lines["vera"].legacy) == ("viewer", False)
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{dir: {tmp_path / 'state'}}}\nweb: {{auth: {{users_file: {users}}}}}\n")
    assert main(["check-config", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"warning: web.auth.users_file {users}: old has no role" in err
    assert f"`ihd-node web-user {users} old --role viewer|operator|admin`" in err and "vera" not in err
    users.write_text(users.read_text() + "eve:superuser:" + hash_password("x" * 8, iterations=1000) + "\n")
    assert main(["check-config", str(config)]) == 2
    assert "role 'superuser' is not one of viewer, operator, admin" in capsys.readouterr().err


def test_web_user_command_writes_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = users_file(tmp_path / "users")

    def web_user(*args: str, password: str) -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
        return main(["web-user", str(users), *args])

    assert web_user("nina", "--role", "operator", password="nina's password") == 0
    assert web_user("old", password="a new password") == 0  # the old line: rewritten with the role it had
    assert web_user("vera", "--role", "admin", password="vera's new password") == 0
    lines = read_users(users)
    assert (lines["nina"].role, lines["old"].role, lines["vera"].role) == ("operator", "operator", "admin")
    assert not lines["old"].legacy and check_password(lines["old"].stored, "a new password")
    assert users.read_text().startswith("# console users\n")  # other lines and comments stay
    assert users.stat().st_mode & 0o777 == 0o600


def test_loopback_without_auth_is_read_only_and_every_route_has_a_role(tmp_path: Path) -> None:
    from ihd_node.config import default_config
    from ihd_node.web.server import WebServer, text

    config = default_config(tmp_path, web={"port": 0})  # 127.0.0.1, no web.auth
    done: list[str] = []
    routes = {("GET", "/"): lambda r: text(200, f"page for {r.user}\n"),
              ("POST", "/actions/retract"): lambda r: done.append("retracted") or text(200, "done\n")}
    server = WebServer(config.web, routes, registry=None).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert call(base + "/") == (200, "page for None\n")  # anyone on this machine may look
        status, body = call(base + "/actions/retract", form={"series": "1.2", "reason": "x"})
        assert status == 403 and "needs the operator role" in body and "console is read-only" in body
        assert done == []
    finally:
        server.stop()
    with pytest.raises(RuntimeError, match="routes without a role in ihd_node.web.auth.ROUTE_ROLES: POST /x"):
        WebServer(config.web, {**routes, ("POST", "/x"): routes[("GET", "/")]}, registry=None).start()
