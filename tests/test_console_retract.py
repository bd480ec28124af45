"""The console's retract action: authenticated, audited (who and why in the event log), refused with why
(no reason, retracted already), the rejection note reaching the PACS; and /metrics naming each
destination's kind."""

from __future__ import annotations

from pathlib import Path

from heads import full_head
from loopback import destination, node_config, running_node, tiny_predictor
from prometheus_client.parser import text_string_to_metric_families
from waiting import poll_until
from webclient import basic, http

from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_datasets
from ihd_node.store import Event
from ihd_node.web.server import hash_password

USER, PASSWORD = "admin", "correct horse battery"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def call(url: str, *, auth: bool = True, form: dict | None = None) -> tuple[int, str]:
    status, text, _ = http(url, auth=basic(USER, PASSWORD) if auth else None, form=form)
    return status, text


def test_console_retract_is_audited_and_refuses_twice(tmp_path: Path) -> None:
    (tmp_path / "users").write_text(f"{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = node_config(tmp_path / "node", [destination("pacs", "PACS", pacs.port)],
                             series={"quiet_seconds": 0.5, "max_wait_seconds": 20.0},
                             analysis={"max_secondary_captures": 1},
                             web={"port": free_port(), "auth": {"users_file": str(tmp_path / "users")}})
        with running_node(config, tiny_predictor()) as node:
            series = full_head(84, n_slices=24, size=64)
            uid = series.series_instance_uid
            assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                 calling_aet="CT1") == [0] * 24
            assert poll_until(lambda: node.db.get_series(uid).state == "delivered", 60)
            base = f"http://127.0.0.1:{node.web.port}"
            study_page = f"{base}/study/{series.study_instance_uid}"
            assert "Retract result" in call(study_page)[1]

            assert call(base + "/actions/retract", auth=False, form={"series": uid, "reason": "x"})[0] == 401
            status, page = call(base + "/actions/retract", form={"series": uid, "reason": " "})
            assert status == 200 and "not retracted: give the reason" in page
            status, page = call(base + "/actions/retract", form={"series": uid, "reason": "wrong side"})
            assert status == 200 and "result retracted" in page and "Retract result" not in page
            assert poll_until(lambda: any(o.sop_class_uid == KOS for o in pacs.objects()), 20)
            assert node.db.get_series(uid).state == "retracted"
            assert node.db.latest_analysis(uid).retracted_by == "admin (console)"
            with node.db.read_session() as s:
                audits = [e.message for e in s.query(Event).filter(Event.kind == "audit").order_by(Event.id)]
            # The users file's line has no role (written before roles): read as operator, and audited so.
            assert audits[0].startswith("retraction by admin (operator) refused: give the reason")
            assert audits[1].startswith("retraction by admin (operator): result revision 0 of series")
            assert "pacs: IOCM rejection note" in audits[1]
            status, page = call(base + "/actions/retract", form={"series": uid, "reason": "again"})
            assert "not retracted" in page and "retracted already" in page
            assert "KOS" in call(study_page)[1]  # the rejection note's row in the deliveries table

            status, text = call(base + "/metrics")
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            key = ("ihd_destination_deliveries", (("destination", "pacs"), ("kind", "dicom"), ("status", "sent")))
            assert samples[key] == len(pacs.objects())
            assert samples[("ihd_series", (("state", "retracted"),))] == 1
