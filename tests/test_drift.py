"""Drift (issue 19): a running node receives a reference cohort, then the same cohort again (new UIDs), then
a cohort from "another scanner protocol" (a sharper kernel and thinner slices). The same cohort raises
nothing; the shifted one opens one drift episode, whose alert reaches a real webhook receiver once (not per
check), and /healthz says "warning" with the reason while staying 200. One node for the module."""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from loopback import node_config, running_node, tiny_predictor
from pydicom.uid import generate_uid
from waiting import poll_until

from ihd_node.config import MonitoringConfig
from ihd_node.monitoring.drift import EPSILON, numeric_bin, psi
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import free_port, send_datasets
from ihd_node.sim.phantom import make_series, write_series

N = 6  # studies per cohort
SEEDS = range(190, 190 + N)


class Hooks:
    """A local webhook receiver that keeps every POSTed JSON body."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                hooks.posts.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def drift(self) -> list[dict]:
        return [p for p in self.posts if p.get("event") == "ihd.drift"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@functools.cache
def phantoms(slice_spacing: float) -> tuple[tuple[Path, ...], ...]:
    """N negative phantom studies (the same seeds for every cohort: the same heads, the same scores)."""
    root = Path(tempfile.mkdtemp(prefix="drift-phantoms-"))
    return tuple(tuple(write_series(make_series(seed, subtypes=[], n_slices=12, size=128,
                                                slice_spacing=slice_spacing), root / f"{slice_spacing}-{seed}"))
                 for seed in SEEDS)


def cohort(*, kernel: str, slice_spacing: float) -> list[list[pydicom.Dataset]]:
    """The phantom studies as new studies (fresh UIDs), with `kernel` written into every header."""
    out = []
    for paths in phantoms(slice_spacing):
        study, series = generate_uid(), generate_uid()
        datasets = [pydicom.dcmread(p) for p in paths]
        for ds in datasets:
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.ConvolutionKernel = study, series, kernel
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(datasets)
    return out


@dataclass
class Site:
    node: Node
    hooks: Hooks
    root: Path

    def send(self, studies: list[list[pydicom.Dataset]]) -> None:
        before = len(self.node.db.analysed_results())
        for datasets in studies:
            # a long DIMSE timeout: on a machine shared by many test runs a C-STORE answer can take over 30 s
            assert set(send_datasets(datasets, host="127.0.0.1", port=self.node.port, called_aet="IHD_AI",
                                     timeout=120)) == {0}
        assert poll_until(lambda: len(self.node.db.analysed_results()) == before + len(studies), 120, every=0.2)

    def checked_after_last_result(self) -> None:
        """Wait for a drift check that saw every result so far."""
        last = self.node.db.analysed_results()[-1].at

        def seen() -> bool:
            report = self.node.drift.last if self.node.drift else None
            return report is not None and report.generated_at > last
        assert poll_until(seen, 30, every=0.1)

    def healthz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.node.web.port}/healthz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("drift")
    hooks = Hooks()
    config = node_config(
        root / "node", [], web={"port": free_port()},
        series={"quiet_seconds": 0.2, "check_geometry": False, "check_coverage": False},
        analysis={"gradcam": False},
        alerts={"channels": [{"name": "ops", "kind": "webhook", "url": hooks.url}]},
        monitoring={"reference_results": N, "min_results": N, "check_seconds": 1.0})
    try:
        with running_node(config, tiny_predictor()) as node:
            yield Site(node, hooks, root)
    finally:
        hooks.close()


def test_psi_and_bins_by_hand() -> None:
    assert psi([5, 5], [5, 5]) == 0.0
    # one bin empty in the reference: the floor EPSILON keeps the index finite (and large)
    expected = (0.5 - 1.0) * __import__("math").log(0.5 / 1.0) + (0.5 - EPSILON) * __import__("math").log(0.5 / EPSILON)
    assert psi([10, 0], [5, 5]) == pytest.approx(expected)
    assert [numeric_bin(v, (1.5, 2.5)) for v in (1.0, 1.5, 2.0, 3.0, None)] == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="warning_psi"):
        MonitoringConfig(warning_psi=0.3, alert_psi=0.2)


def test_the_same_cohort_raises_nothing_and_a_shifted_one_alerts_once(site: Site) -> None:
    site.send(cohort(kernel="STANDARD", slice_spacing=5.0))
    site.checked_after_last_result()
    assert site.node.drift.last.status == "too_few"  # the reference alone: nothing to compare yet

    site.send(cohort(kernel="STANDARD", slice_spacing=5.0))
    site.checked_after_last_result()
    report = site.node.drift.last
    assert (report.n_reference, report.n_current, report.status) == (N, N, "ok"), report.to_json()
    assert max(f.psi for f in report.features) == pytest.approx(0.0, abs=1e-9)
    assert site.node.db.open_drift_episode() is None and site.hooks.drift() == []
    status, body = site.healthz()
    assert (status, body["status"]) == (200, "ready"), body

    site.send(cohort(kernel="BONE", slice_spacing=2.5))
    site.checked_after_last_result()
    report = site.node.drift.last
    assert report.status == "alert", report.to_json()
    alerted = {f.name for f in report.over("alert")}
    assert {"input_kernel", "input_slice_thickness"} <= alerted
    for name in ("input_manufacturer", "input_model_name", "input_enhanced", "input_pixel_spacing"):
        assert name not in alerted  # what did not change is not blamed
    kernel = next(f for f in report.features if f.name == "input_kernel")
    assert (kernel.bins, kernel.reference, kernel.current) == (["STANDARD", "BONE"], [N, 0], [N, N])

    assert poll_until(lambda: len(site.hooks.drift()) == 1, 30, every=0.1)
    episode = site.node.db.open_drift_episode()
    assert episode is not None and "Reconstruction kernel" in episode.reason
    alert = site.hooks.drift()[0]
    assert alert["not_for_diagnostic_use"] is True and alert["episode"] == episode.id
    assert "Reconstruction kernel" in alert["reason"] and "Slice thickness" in alert["reason"]

    status, body = site.healthz()
    assert status == 200 and body["status"] == "warning", body
    assert "Reconstruction kernel" in body["warning"]

    # Later checks of the same episode book no second alert.
    checks = site.node.drift.last.generated_at
    assert poll_until(lambda: site.node.drift.last.generated_at > checks, 20, every=0.1)
    site.checked_after_last_result()
    assert len(site.node.db.drift_episodes()) == 1
    rows = site.node.db.drift_alerts(episode.id)
    assert [(r.channel, r.status) for r in rows] == [("ops", "sent")]
    assert len(site.hooks.drift()) == 1


def test_input_facts_of_classic_and_enhanced_ct(tmp_path: Path) -> None:
    """The facts come from the headers; an Enhanced CT's kernel and kVp from its functional groups."""
    from enhanced_ct import enhanced_from_slices
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from ihd_node.imaging.volume import load_volume
    from ihd_node.monitoring.inputs import input_facts

    series = make_series(7, subtypes=[], n_slices=12, size=64, slice_spacing=4.0, pixel_spacing=3.5)
    paths = write_series(series, tmp_path / "classic")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ConvolutionKernel, ds.KVP = ["FC", "21"], "120"
        ds.save_as(p)
    facts = input_facts(load_volume(paths))
    assert facts == {"manufacturer": "ihd-node phantom", "model_name": "synthetic head CT", "kernel": "FC\\21",
                     "enhanced": False, "slice_thickness": pytest.approx(4.0), "kvp": 120.0,
                     "pixel_spacing": pytest.approx(3.5)}

    enhanced = enhanced_from_slices([pydicom.dcmread(p) for p in paths])
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    recon, xray = Dataset(), Dataset()
    recon.ConvolutionKernel = "H30s"
    xray.KVP = "100"
    shared.CTReconstructionSequence = DicomSequence([recon])
    shared.CTXRayDetailsSequence = DicomSequence([xray])
    for keyword in ("ConvolutionKernel", "KVP"):
        if keyword in enhanced:
            delattr(enhanced, keyword)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    facts = input_facts(load_volume([path]))
    assert (facts["enhanced"], facts["kernel"], facts["kvp"]) == (True, "H30s", 100.0)
    assert facts["slice_thickness"] == pytest.approx(4.0) and facts["pixel_spacing"] == pytest.approx(3.5)


def test_one_episode_one_alert_per_channel_until_it_ends(tmp_path: Path) -> None:
    from ihd_node.monitoring.watch import drift_warning
    from ihd_node.store import open_database

    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        assert drift_warning(db) is None and db.end_drift() is None
        first, new = db.book_drift(reason="Reconstruction kernel PSI 4.2", feature="input_kernel", psi=4.2,
                                   channels=["ops", "mail"])
        assert new
        again, new = db.book_drift(reason="Reconstruction kernel PSI 4.5", feature="input_kernel", psi=4.5,
                                   channels=["ops", "mail"])
        assert not new and again.id == first.id and again.worst_psi == 4.5
        assert sorted(a.channel for a in db.drift_alerts(first.id)) == ["mail", "ops"]
        assert "Reconstruction kernel PSI 4.5" in drift_warning(db)
        assert db.end_drift().id == first.id and db.open_drift_episode() is None and drift_warning(db) is None
        second, new = db.book_drift(reason="Slice thickness PSI 1.0", feature="input_slice_thickness", psi=1.0,
                                    channels=["ops"])
        assert new and second.id != first.id and len(db.drift_alerts(second.id)) == 1
    finally:
        db.close()


def test_windows_by_weeks_and_by_results() -> None:
    """The reference is the first weeks (or the first N results); the current window the last days after it."""
    from datetime import UTC, datetime, timedelta

    from ihd_node.monitoring.drift import drift_report
    from ihd_node.store import AnalysedResult

    start = datetime(2026, 1, 5, tzinfo=UTC)
    inputs = {"manufacturer": "X", "model_name": "Y", "kernel": "K", "enhanced": False, "slice_thickness": 5.0,
              "kvp": 120.0, "pixel_spacing": 0.5}
    rows = [AnalysedResult(f"1.2.{k}", start + timedelta(days=k), dict.fromkeys(("any", "epidural",
            "intraparenchymal", "intraventricular", "subarachnoid", "subdural"), 0.1 + 0.01 * (k % 7)),
            ("any",) if k % 3 == 0 else (), {**inputs, "kernel": "K" if k < 40 else "B"}) for k in range(60)]

    class Rows:
        def analysed_results(self, since=None, until=None):
            return [r for r in rows if (since is None or r.at >= since) and (until is None or r.at < until)]

    now = start + timedelta(days=59, hours=1)
    by_weeks = drift_report(Rows(), MonitoringConfig(reference_weeks=4, window_days=7, min_results=5), now)
    assert by_weeks.n_reference == 28 and by_weeks.reference == (start, start + timedelta(weeks=4))
    assert by_weeks.n_current == 7 and by_weeks.current[0] == now - timedelta(days=7)
    assert by_weeks.status == "alert" and by_weeks.over("alert")[0].name == "input_kernel"  # days 53-59: B
    by_results = drift_report(Rows(), MonitoringConfig(reference_results=10, window_days=100, min_results=5), now)
    assert by_results.n_reference == 10 and by_results.n_current == 50
    kernel = next(f for f in by_results.features if f.name == "input_kernel")
    assert (kernel.bins, kernel.reference, kernel.current) == (["K", "B"], [10, 0], [30, 20])
    assert drift_report(Rows(), MonitoringConfig(reference_weeks=4, min_results=30), now).status == "too_few"
    assert by_weeks.reference_positivity == pytest.approx(10 / 28)


def test_a_failing_drift_check_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the drift check must not make the node's loop fail (that would read as "degraded", 503)."""
    from ihd_node.config import default_config
    from ihd_node.monitoring import watch
    from ihd_node.store import open_database

    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        drift = watch.DriftWatch(db, default_config(tmp_path))

        def broken(*args, **kwargs):
            raise ZeroDivisionError("a bug")
        monkeypatch.setattr(watch, "drift_report", broken)
        assert drift.step() > 0 and drift.last is None
    finally:
        db.close()
