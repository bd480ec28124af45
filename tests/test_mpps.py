"""The node as an MPPS SCP (N-CREATE / N-SET with pynetdicom on loopback): a COMPLETED step listing 24
instances while only 20 arrived holds the series until the rest arrive (then at once, rule "mpps") or until
series.max_wait_seconds (then INCOMPLETE SERIES); DISCONTINUED cancels the waiting; untrusted callers are not
used. The geometry and coverage checks are off here, so MPPS alone holds the series back."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pydicom
import pytest
from heads import full_head, full_head_spacing
from loopback import destination, node_config, running_node, tiny_predictor
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select
from waiting import poll_until

from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, send_datasets
from ihd_node.sim.phantom import PhantomSeries, make_series
from ihd_node.store import Event

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
QUIET, MAX_WAIT = 0.5, 6.0


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, MiniPACS]]:
    root = tmp_path_factory.mktemp("mpps")
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        config = node_config(root / "state", [destination("pacs", "PACS", pacs.port)],
                             series={"quiet_seconds": QUIET, "max_wait_seconds": MAX_WAIT, "trust_mpps": ["CT1"]},
                             analysis={"max_secondary_captures": 1})
        with running_node(config, tiny_predictor()) as node:
            yield node, pacs


def wait_until(condition: Callable[[], object], seconds: float = 120.0) -> bool:
    return poll_until(condition, seconds)


def step(series: list[Dataset]) -> tuple[Dataset, Dataset]:
    """(N-CREATE attributes, N-SET COMPLETED modification) of a step that made `series`."""
    first = series[0]
    create = Dataset()
    scheduled = Dataset()
    scheduled.StudyInstanceUID = first.StudyInstanceUID
    scheduled.AccessionNumber = ""
    create.ScheduledStepAttributesSequence = [scheduled]
    create.PerformedProcedureStepID = "1"
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedSeriesSequence = []
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    item = Dataset()
    item.SeriesInstanceUID = first.SeriesInstanceUID
    item.ReferencedImageSequence = []
    for ds in series:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.ReferencedImageSequence.append(ref)
    item.ReferencedNonImageCompositeSOPInstanceSequence = []
    done.PerformedSeriesSequence = [item]
    return create, done


def mpps(port: int, create: Dataset, modification: Dataset | None, calling: str = "CT1") -> list[int]:
    """N-CREATE, then N-SET (when given) over one association, as a scanner does; the statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="IHD_AI")
    assert assoc.is_established
    uid = generate_uid()
    try:
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
        statuses = [int(status.Status)]
        if modification is not None:
            status, _ = assoc.send_n_set(modification, ModalityPerformedProcedureStep, uid)
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def store(port: int, datasets: list[Dataset]) -> None:
    assert send_datasets(datasets, host="127.0.0.1", port=port, called_aet="IHD_AI",
                         calling_aet="CT1") == [0] * len(datasets)


def srs(pacs: MiniPACS, study_uid: str) -> list[Dataset]:
    return [pydicom.dcmread(o.path) for o in pacs.objects(study_uid) if o.sop_class_uid == SR_CLASS]


def upper(series: PhantomSeries, n: int) -> list[Dataset]:
    """The `n` uppermost slices of a series, in spatial order."""
    by_sop = {ds.SOPInstanceUID: ds for ds in series.datasets}
    return [by_sop[sop] for sop in series.sop_uids_sorted[-n:]]


def events(node: Node, kind: str, uid: str | None = None) -> list[str]:
    with node.db.read_session() as s:
        query = select(Event).where(Event.kind == kind).order_by(Event.id)
        if uid:
            query = query.where(Event.series_instance_uid == uid)
        return [e.message for e in s.scalars(query)]


def test_completed_mpps_holds_the_series_until_the_rest_arrive_then_at_once(running) -> None:
    node, pacs = running
    series = full_head(51, n_slices=24, size=64)
    uid, study = series.series_instance_uid, series.study_instance_uid
    assert mpps(node.port, *step(series.datasets)) == [0, 0]
    store(node.port, series.datasets[:20])
    assert wait_until(lambda: events(node, "held", uid), 60)  # quiet, but held back by the MPPS list
    assert node.db.get_series(uid).state == "received" and not srs(pacs, study)
    [held] = events(node, "held", uid)
    assert held.startswith("instances=20; mpps: 4 of 24 instances listed by MPPS")
    # The rest arrive over an association kept open: the MPPS list, not the quiet rule, completes it.
    ae = AE(ae_title="CT1")
    ae.add_requested_context(series.datasets[0].SOPClassUID, str(series.datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.port, ae_title="IHD_AI")
    try:
        for ds in series.datasets[20:]:
            assert assoc.send_c_store(ds).Status == 0
        assert wait_until(lambda: node.db.get_series(uid).state != "received", 10)
    finally:
        assoc.release()
    row = node.db.get_series(uid)  # the database's stamps: completed by the list, long before max_wait
    assert row.completion_rule == "mpps" and (row.completed - row.last_received).total_seconds() < MAX_WAIT
    assert wait_until(lambda: node.db.get_series(uid).state == "delivered")
    [sr] = srs(pacs, study)
    assert sr.CompletionFlag == "COMPLETE"
    completion = node.db.latest_completion(uid)
    assert completion.rule == "mpps" and completion.preliminary is None and completion.n_instances == 24
    assert any("COMPLETED listing 24 instance(s)" in m for m in events(node, "mpps"))


def test_completed_mpps_with_instances_never_arriving_gives_a_preliminary_result(running) -> None:
    node, pacs = running
    series = full_head(52, n_slices=24, size=64)
    uid, study = series.series_instance_uid, series.study_instance_uid
    assert mpps(node.port, *step(series.datasets)) == [0, 0]
    store(node.port, series.datasets[:20])
    assert wait_until(lambda: node.db.get_series(uid).state == "delivered", 120)
    row = node.db.get_series(uid)  # the database's stamps: not before max_wait after the last instance
    assert row.completion_rule == "max_wait" and (row.completed - row.last_received).total_seconds() >= MAX_WAIT
    [sr] = srs(pacs, study)
    assert sr.CompletionFlag == "PARTIAL"
    assert node.db.latest_completion(uid).preliminary.startswith("mpps: 4 of 24 instances listed by MPPS")


def test_discontinued_or_untrusted_mpps_does_not_hold_a_series(running) -> None:
    node, pacs = running
    # 24 slices whose upper 20 span the head: sent alone, geometry and coverage pass and only MPPS could hold.
    discontinued = full_head(53, n_slices=24, size=64, slice_spacing=full_head_spacing(20))
    create, _ = step(discontinued.datasets)
    stop = Dataset()
    stop.PerformedProcedureStepStatus = "DISCONTINUED"
    assert mpps(node.port, create, stop) == [0, 0]
    untrusted = full_head(54, n_slices=24, size=64, slice_spacing=full_head_spacing(20))
    assert mpps(node.port, *step(untrusted.datasets), calling="OTHER_CT") == [0, 0]
    for series in (discontinued, untrusted):
        store(node.port, upper(series, 20))
        assert wait_until(lambda s=series: node.db.get_series(s.series_instance_uid).state == "delivered", 60)
        row = node.db.get_series(series.series_instance_uid)
        assert (row.completed - row.last_received).total_seconds() < MAX_WAIT  # the quiet rule, not max_wait
        assert node.db.latest_completion(series.series_instance_uid).rule == "quiet"
    assert any("not trusted" in m for m in events(node, "mpps"))


def test_mpps_protocol_errors_get_dimse_failure_statuses(running) -> None:
    node, _ = running
    series = make_series(55, subtypes=[], n_slices=2, size=64)
    create, done = step(series.datasets)
    wrong = Dataset()
    wrong.PerformedProcedureStepStatus = "COMPLETED"  # a step must be created IN PROGRESS
    assert mpps(node.port, wrong, None) == [0x0106]
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="IHD_AI")
    try:
        unknown, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, generate_uid())
        assert unknown.Status == 0x0112  # no such step
        uid = generate_uid()
        assert assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)[0].Status == 0
        assert assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)[0].Status == 0x0111
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)[0].Status == 0
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)[0].Status == 0x0110  # finished
    finally:
        assoc.release()
    row = node.db.get_mpps(uid)
    assert row.status == "COMPLETED" and row.trusted == 1 and node.db.mpps_instance_count(uid) == 2

