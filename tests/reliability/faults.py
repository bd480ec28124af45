"""Helpers of the crash / outage / late / disk tests (the harness itself is conftest.py).

- `make_study`: a full-head phantom series written to files (128x128, 24 slices unless asked).
- `store`: a C-STORE SCU that survives the node dying under it (answers None for what got no answer),
  as a PACS routing a study would see it.
- `crash_env` / `pause_env`: the environment that arms a fault point of ihd_node.faults in the node.
- `check_results_once`: the PACS holds each result object once, and exactly the set the node's outbox
  says it sent, and every object is one the deterministic UID scheme predicts.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from heads import full_head, full_head_spacing
from pydicom import uid as tsuid
from pynetdicom import AE, evt

from ihd_node.dicom_requestor import on_outgoing_connection
from ihd_node.faults import CRASH_ENV, PAUSE_ENV
from ihd_node.sim.mini_pacs import MiniPACS
from ihd_node.sim.phantom import PhantomSeries, write_series
from ihd_node.uids import result_uid

NODE_AET = "IHD_AI"  # same as conftest (not imported: conftest is not a module of a package)
SENDER_AET = "PACS"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation (the attention regions of a positive result)
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection (its key images)


@dataclass
class Study:
    phantom: PhantomSeries
    files: list[Path]  # in spatial order (sorted along the slice normal)
    sop_of: dict[Path, str] = field(default_factory=dict)

    @property
    def series_uid(self) -> str:
        return self.phantom.series_instance_uid

    @property
    def study_uid(self) -> str:
        return self.phantom.study_instance_uid

    @property
    def sop_uids(self) -> list[str]:
        return list(self.phantom.sop_uids_sorted)


def make_study(folder: Path, seed: int, n_slices: int = 24, subtypes: tuple[str, ...] = ("subdural",),
               slice_spacing: float | None = None) -> Study:
    """A phantom head-CT series, skull base to vertex (tests/heads.py), as files listed in spatial order (so a
    test can hold back some). `slice_spacing` wider than a full head's leaves slices to spare at the ends."""
    phantom = full_head(seed, subtypes, n_slices=n_slices, size=128,
                        slice_spacing=slice_spacing or full_head_spacing(n_slices))
    paths = write_series(phantom, folder)
    by_sop = {str(ds.SOPInstanceUID): path for ds, path in zip(phantom.datasets, paths, strict=True)}
    files = [by_sop[uid] for uid in phantom.sop_uids_sorted]
    return Study(phantom, files, {p: s for s, p in by_sop.items()})


def store(paths: list[Path], port: int, *, called_aet: str = NODE_AET, calling_aet: str = SENDER_AET,
          host: str = "127.0.0.1", timeout: float = 30.0, pace: float = 0.0) -> list[int | None]:
    """C-STORE the files over one association; the DIMSE status of each, None where no answer came
    (the node died or was refusing associations). `pace`: seconds between instances (a slow modality)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called_aet,  # the requestor loop that loses no response
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_outgoing_connection)])
    if not assoc.is_established:
        return [None] * len(datasets)
    statuses: list[int | None] = []
    try:
        for i, ds in enumerate(datasets):
            if pace and i:
                time.sleep(pace)
            if not assoc.is_established:
                statuses.append(None)
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:
                statuses.append(None)
                continue
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def crash_env(point: str, nth: int = 1) -> dict[str, str]:
    """The node SIGKILLs itself the nth time it passes `point` (see ihd_node/faults.py)."""
    return {CRASH_ENV: f"{point}:{nth}"}


def pause_env(point: str, nth: int = 1) -> dict[str, str]:
    """The node's thread blocks at `point` (the test then kills the process from outside)."""
    return {PAUSE_ENV: f"{point}:{nth}"}


def wait_log(node: object, text: str, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in node.log():  # type: ignore[attr-defined]
            return True
        time.sleep(0.05)
    return False


def start(node: object, extra_env: dict[str, str] | None = None, seconds: float = 90.0) -> object:
    """(Re)start the node and wait until THIS run listens. NodeProcess.start(wait=True) looks for
    "scp.listening" anywhere in the appended log, so on a restart it would return at once."""
    offset = len(node.log())  # type: ignore[attr-defined]
    node.start(extra_env=extra_env, wait=False)  # type: ignore[attr-defined]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if "scp.listening" in node.log()[offset:]:  # type: ignore[attr-defined]
            return node
        if node.process.poll() is not None:  # type: ignore[attr-defined]
            break
        time.sleep(0.05)
    raise AssertionError(f"node did not start:\n{node.log()[offset:][-3000:]}")  # type: ignore[attr-defined]


def done(node: object) -> None:
    """End of a test: SIGKILL the node rather than let the harness stop it with SIGTERM (which waits for
    its threads, seconds per test); everything the test wanted is checked by then."""
    if node.process is not None and node.process.poll() is None:  # type: ignore[attr-defined]
        node.kill9()  # type: ignore[attr-defined]


def wait_exit(node: object, seconds: float = 60.0) -> int:
    """Wait until the node process ends by itself (a crash point), reap it, return its exit code."""
    code = node.process.wait(timeout=seconds)  # type: ignore[attr-defined]
    node.kill9()  # type: ignore[attr-defined]  # already dead: only reaps and closes the log file
    return code


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class ResultCheck:
    received: list[str]  # SOP Instance UIDs in the order the PACS received them (with repeats)
    stored: set[str]  # SOP Instance UIDs of the files the PACS holds
    duplicates: dict[str, int]  # UID -> times received, for those received more than once
    revisions: dict[int, dict]  # revision -> sr uid, sc series uid, number of captures


def check_results_once(pacs: MiniPACS, node: object, study: Study) -> ResultCheck:
    """Assert the PACS holds each result object once and exactly what the node's outbox booked as sent;
    that the latest analysis is there completely; and that every object carries a UID the deterministic
    scheme (ihd_node.uids) gives for this series, model and revision. Returns what was found."""
    analyses = node.query(  # type: ignore[attr-defined]
        "SELECT a.revision, a.model_name, a.model_version, a.sr_sop_instance_uid, a.n_secondary_captures, "
        "a.n_model_slices, a.settings_key FROM analyses a JOIN series s ON s.id = a.series_id "
        "WHERE s.series_instance_uid = ? ORDER BY a.revision", study.series_uid)
    assert analyses, "no analysis recorded"
    revisions: dict[int, dict] = {}
    allowed: dict[str, tuple[str, int]] = {}  # SOP UID -> (kind, report revision)
    for revision, name, version, sr_uid, n_sc, n_model, key in analyses:
        report_rev = revision - 1  # analyses.revision counts from 1; the report's revision from 0
        expected_sr = result_uid(study.series_uid, name, version, "sr", 0, report_rev, settings=key)
        assert sr_uid == expected_sr, "SR UID is not the deterministic one"
        sc_series = result_uid(study.series_uid, name, version, "sc-series", 0, report_rev, settings=key)
        revisions[revision] = {"sr": sr_uid, "sc_series": sc_series, "n_sc": n_sc}
        allowed[sr_uid] = ("SR", revision)
        allowed[result_uid(study.series_uid, name, version, "sc-summary", 0, report_rev, settings=key)] = (
            "SC", revision)
        for index in range(n_model):
            allowed[result_uid(study.series_uid, name, version, "sc", index, report_rev, settings=key)] = (
                "SC", revision)
        for kind in ("seg", "kos"):  # a positive result's Segmentation and key images
            allowed[result_uid(study.series_uid, name, version, kind, 0, report_rev, settings=key)] = (
                kind.upper(), revision)

    objects = pacs.objects(study.study_uid)
    received = [o.sop_instance_uid for o in objects]
    stored = {p.stem for p in pacs.folder.glob("*.dcm")} & set(received)
    counts = Counter(received)
    unexpected = set(received) - set(allowed)
    assert not unexpected, f"objects the node should never have made: {unexpected}"
    sent = {uid for (uid,) in node.query(  # type: ignore[attr-defined]
        "SELECT d.sop_instance_uid FROM deliveries d JOIN series s ON s.id = d.series_id "
        "WHERE s.series_instance_uid = ? AND d.status = 'sent'", study.series_uid)}
    assert set(received) == sent, f"PACS has {set(received) - sent} not booked, lacks {sent - set(received)}"
    assert stored == set(received), "the PACS folder should hold one file per SOP Instance UID"

    # The latest analysis arrived completely: its SR and all its captures, in its own SC series.
    latest = max(revisions)
    by_uid = {o.sop_instance_uid: o for o in objects}
    assert revisions[latest]["sr"] in by_uid
    scs = [o for o in objects if allowed[o.sop_instance_uid] == ("SC", latest)]
    assert len({o.sop_instance_uid for o in scs}) == revisions[latest]["n_sc"]
    assert {o.series_instance_uid for o in scs} <= {revisions[latest]["sc_series"]}
    for o in objects:  # each object in the series its kind and revision call for
        kind, rev = allowed[o.sop_instance_uid]
        assert o.sop_class_uid == {"SR": SR_CLASS, "SEG": SEG_CLASS, "KOS": KOS_CLASS}.get(kind, SC_CLASS)
        if kind == "SC":
            assert o.series_instance_uid == revisions[rev]["sc_series"]
    return ResultCheck(received, stored, {u: n for u, n in counts.items() if n > 1}, revisions)


def instance_rows(node: object, series_uid: str) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (spool path, sha256) of the node's instance rows of a series."""
    rows = node.query(  # type: ignore[attr-defined]
        "SELECT i.sop_instance_uid, i.path, i.sha256 FROM instances i JOIN series s ON s.id = i.series_id "
        "WHERE s.series_instance_uid = ?", series_uid)
    return {sop: (path, sha) for sop, path, sha in rows}
