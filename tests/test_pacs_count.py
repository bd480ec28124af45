"""The PACS's count as completion evidence, against a real Orthanc answering C-FIND: with
destinations[].count_instances the node asks NumberOfSeriesRelatedInstances before calling a quiet series
complete, and waits while it holds fewer instances than the PACS. A series the PACS does not know is not
held (no evidence either way). Geometry and coverage checks run as shipped: the node is first sent a part of
the stack that already spans the head (a full-head phantom with spare slices below it), so the count alone
holds it back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from heads import full_head, full_head_spacing
from loopback import destination, node_config, running_node, tiny_predictor
from orthanc import ORTHANC_BINARY, Orthanc
from sqlalchemy import select
from waiting import poll_until

from ihd_node.sim.mini_pacs import free_port, send_datasets
from ihd_node.sim.phantom import write_series
from ihd_node.store import Event

pytestmark = pytest.mark.skipif(ORTHANC_BINARY is None,
                                reason="Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
QUIET = 0.5


def wait_until(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    return poll_until(condition, seconds)


def test_node_waits_while_the_pacs_holds_more_instances_of_the_series(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", ai_ae_title="IHD_AI", ai_port=node_port).start()
    try:
        config = node_config(tmp_path / "node",
                             [destination("orthanc", orthanc.aet, orthanc.dicom_port, count_instances=True)],
                             port=node_port,
                             series={"quiet_seconds": QUIET, "max_wait_seconds": 30.0},
                             analysis={"max_secondary_captures": 1})
        with running_node(config, tiny_predictor()) as node:
            # 24 slices; the upper 20 alone span skull base to vertex: geometry and coverage pass on them.
            series = full_head(61, n_slices=24, size=64, slice_spacing=full_head_spacing(20))
            by_sop = {ds.SOPInstanceUID: ds for ds in series.datasets}
            spatial = [by_sop[sop] for sop in series.sop_uids_sorted]
            for f in write_series(series, tmp_path / "study"):
                orthanc.upload(f)  # the PACS already has the whole series
            uid = series.series_instance_uid

            def store(datasets) -> None:
                assert send_datasets(datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                     calling_aet="CT1") == [0] * len(datasets)

            upper, lower = spatial[4:], spatial[:4]
            store(upper)
            time.sleep(QUIET + 2.0)
            assert node.db.get_series(uid).state == "received"
            with node.db.read_session() as s:
                held = [e.message for e in s.scalars(select(Event).where(
                    Event.series_instance_uid == uid, Event.kind == "held"))]
            assert held == ["instances=20; pacs: destination orthanc holds 24 instances of the series, the node 20"]

            store(lower)
            assert wait_until(lambda: node.db.get_series(uid).state == "delivered")
            completion = node.db.latest_completion(uid)
            assert completion.rule == "quiet" and completion.evidence == "checks passed: pacs, geometry, coverage"
            assert completion.n_instances == 24 and completion.preliminary is None

            unknown = full_head(62, n_slices=24, size=64)  # not in the PACS: no evidence from the count
            store(unknown.datasets)
            assert wait_until(lambda: node.db.get_series(unknown.series_instance_uid).state == "delivered", 20)
            evidence = node.db.latest_completion(unknown.series_instance_uid).evidence
            assert evidence == "checks passed: geometry, coverage"
    finally:
        orthanc.stop()
