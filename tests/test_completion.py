"""Never report on half a series: completion evidence (geometry, head coverage) on phantom files, and the
whole node on loopback with the shipped default model:
(a) a console pushing a 24-slice head CT one association per image, top half first, pausing 4 s after 12
    images, gets exactly one SR, on the complete series, naming the subdural bleed of the lower half;
(c) a series with a slice missing in the middle waits, then goes out marked INCOMPLETE SERIES with the gap
    named; the missing slice then gives a complete revision that says it replaces the incomplete result."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import torch
from loopback import destination, node_config, running_node
from pydicom.dataset import Dataset
from sqlalchemy import select
from waiting import poll_until

from ihd_node.classes import INCOMPLETE_SERIES_LINE
from ihd_node.commands.log import format_log, log_data
from ihd_node.commands.status import format_status, status_data
from ihd_node.imaging.coverage import find_gaps
from ihd_node.imaging.headers import SliceGeometry, geometry_cache, read_geometry
from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT
from ihd_node.model.pipeline import Predictor
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, send_datasets
from ihd_node.sim.phantom import make_series, write_series
from ihd_node.store import Event
from ihd_node.triage.completion import CompletionJudge

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEED = 1300  # its subdural lies on slices 5-11 of 24 (checked in console_series)
GEOMETRY = {"n_slices": 24, "size": 256, "slice_spacing": 7.0, "tilt_deg": 0.0, "shuffle": False}


def incompleteness_note(ds: Dataset) -> str:
    """Where a Segmentation (ImageComments) or a key object selection (its description) says more."""
    if ds.Modality == "SEG":
        return str(ds.get("ImageComments", ""))
    return " ".join(str(i.TextValue) for i in ds.ContentSequence if i.ValueType == "TEXT")


def console_series() -> list[Dataset]:
    """24 slices, skull base to vertex, inferior first: a subdural bleed in the lower half only.

    The same seed gives the same head with or without blood (phantom.py), so the upper 12 slices come from
    the bleed-free head: the upper half alone is a negative study."""
    bleed = make_series(SEED, subtypes=["subdural"], **GEOMETRY)
    clean = make_series(SEED, subtypes=[], **GEOMETRY)
    assert bleed.encoding == clean.encoding
    assert bleed.labels[:12, 5].any()
    out = []
    for k, ds in enumerate(bleed.datasets):
        ds = copy.deepcopy(ds)
        if k >= 12:
            ds.PixelData = clean.datasets[k].PixelData
        out.append(ds)
    return out


def write(datasets: list[Dataset], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------ the checks on their own


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """(SOP UID, path) of a head phantom's 24 slices, inferior to superior."""
    series = make_series(7, subtypes=[], **{**GEOMETRY, "size": 192})
    paths = write_series(series, tmp_path_factory.mktemp("head"))
    by_uid = {read_geometry(str(p)).sop_instance_uid: str(p) for p in paths}
    return [(uid, by_uid[uid]) for uid in series.sop_uids_sorted]


def test_a_whole_head_passes_and_half_a_head_is_held_back_by_coverage(files) -> None:
    judge = CompletionJudge()
    assert judge.evidence("1.2", "1.2.3", files).complete
    top = judge.evidence("1.2", "1.2.4", files[12:])
    assert not top.complete
    assert top.holds[0].startswith("coverage: bottom slice") and "does not reach the skull base" in top.holds[0]
    bottom = judge.evidence("1.2", "1.2.5", files[:12])
    assert "top slice" in bottom.holds[0] and "does not reach the vertex" in bottom.holds[0]


def test_a_gap_in_the_middle_is_held_back_by_geometry_and_named(files) -> None:
    judge = CompletionJudge(check_coverage=False)
    evidence = judge.evidence("1.2", "1.2.6", files[:9] + files[11:])
    [hold] = evidence.holds
    assert hold.startswith("geometry: gap of 21.0 mm") and "about 2 slice(s) missing" in hold
    # A protocol that changes spacing part way (3.5 mm below, 7 mm above) is one contiguous run.
    positions = [3.5 * k for k in range(9)] + [28.0 + 7.0 * k for k in range(1, 12)]
    assert find_gaps([SliceGeometry("", "", z, (0, 0, 1), None, 0.5) for z in positions]) == []
    positions.remove(49.0)
    [gap] = find_gaps([SliceGeometry("", "", z, (0, 0, 1), None, 0.5) for z in positions])
    assert gap.startswith("gap of 14.0 mm between slices at 42.0 and 56.0 mm")


def test_headers_are_read_once_per_instance(files) -> None:
    cache = geometry_cache()
    judge = CompletionJudge(check_coverage=False, cache=cache)
    judge.evidence("1.2", "1.2.7", files[:20], version=1)
    assert cache.reads == 20
    judge.evidence("1.2", "1.2.7", files, version=2)  # four more arrived: four more header reads
    assert cache.reads == 24
    judge.evidence("1.2", "1.2.7", files, version=2)
    assert cache.reads == 24


# ------------------------------------------------------------------ the node on loopback


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip("the shipped default model is missing")
    torch.set_num_threads(1)
    return Predictor.load("default", device="cpu")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, predictor: Predictor) -> Iterator[tuple[Node, MiniPACS]]:
    root = tmp_path_factory.mktemp("node")
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        config = node_config(root / "state", [destination("pacs", "PACS", pacs.port)],
                             series={"quiet_seconds": 1.0, "max_wait_seconds": 8.0},
                             analysis={"max_secondary_captures": 2})
        with running_node(config, predictor) as node:
            yield node, pacs


def wait_until(condition: Callable[[], object], seconds: float = 120.0) -> bool:
    return poll_until(condition, seconds)


def srs(pacs: MiniPACS, study_uid: str) -> list[Dataset]:
    return [pydicom.dcmread(o.path) for o in pacs.objects(study_uid) if o.sop_class_uid == SR_CLASS]


def summary(sr: Dataset) -> str:
    def walk(items):
        for item in items:
            if "TextValue" in item:
                yield str(item.TextValue)
            yield from walk(item.get("ContentSequence", []))
    [text] = [t for t in walk(sr.ContentSequence) if "not verified by a physician" in t]
    return text


def events(node: Node, uid: str, kind: str) -> list[str]:
    with node.db.read_session() as s:
        return [e.message for e in s.scalars(select(Event).where(
            Event.series_instance_uid == uid, Event.kind == kind).order_by(Event.id))]


def test_console_pushing_top_half_first_gets_one_sr_on_the_complete_series(running) -> None:
    node, pacs = running
    datasets = console_series()
    uid, study = str(datasets[0].SeriesInstanceUID), str(datasets[0].StudyInstanceUID)
    top_first = datasets[12:][::-1] + datasets[:12][::-1]  # vertex down, as the console reconstructs
    for k, ds in enumerate(top_first):
        assert send_datasets([ds], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                             calling_aet="CT1") == [0]  # one association per image
        if k == 11:
            time.sleep(4.0)  # the console pauses: 4 s, four times quiet_seconds
            assert node.db.get_series(uid).state == "received"  # held back, not analysed
            assert node.db.latest_analysis(uid) is None
    assert wait_until(lambda: node.db.get_series(uid).state == "delivered")
    time.sleep(0.5)
    [sr] = srs(pacs, study)  # exactly one SR
    assert sr.CompletionFlag == "COMPLETE"
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == 24
    assert "subdural" in summary(sr) and "INCOMPLETE SERIES" not in summary(sr)
    analysis = node.db.latest_analysis(uid)
    assert analysis.revision == 1 and analysis.n_slices == 24 and "subdural" in analysis.positives()
    held = events(node, uid, "held")  # one per change of reason (a loaded machine may see 13, 14, ... too)
    assert held[0].startswith("instances=12; coverage: bottom slice") and "skull base" in held[0]
    assert all(h.startswith("instances=") and "instances=24" not in h for h in held)
    completion = node.db.latest_completion(uid)
    assert completion.preliminary is None and completion.rule == "quiet"
    assert completion.evidence == "checks passed: geometry, coverage"


def test_missing_middle_slice_waits_then_goes_out_preliminary_and_the_revision_replaces_it(running) -> None:
    node, pacs = running
    series = make_series(SEED + 1, subtypes=["subdural"], **GEOMETRY)
    uid, study = series.series_instance_uid, series.study_instance_uid
    missing = series.datasets[15]
    sent_at = time.monotonic()
    assert send_datasets(series.datasets[:15] + series.datasets[16:], host="127.0.0.1", port=node.port,
                         called_aet="IHD_AI", calling_aet="CT1") == [0] * 23
    # Past quiet_seconds: held back by the gap (waited for, not slept: the machine may be loaded).
    assert wait_until(lambda: "gap of 14.0 mm" in (node.db.get_series(uid).reason or ""), 7.0)
    assert node.db.get_series(uid).state == "received" and not srs(pacs, study)
    assert "held: geometry: gap of 14" in format_status(status_data(node.db))  # what `ihd-node status` shows
    assert wait_until(lambda: node.db.get_series(uid).state == "delivered")
    assert time.monotonic() - sent_at >= 8.0  # max_wait_seconds
    [first] = srs(pacs, study)
    assert first.CompletionFlag == "PARTIAL"
    text = summary(first)
    assert text.startswith("INCOMPLETE SERIES - analysed before all images may have arrived: geometry: gap of 14.0 mm")
    assert "about 1 slice(s) missing" in text
    results = [pydicom.dcmread(o.path) for o in pacs.objects(study) if o.sop_class_uid != SR_CLASS]
    captures = [ds for ds in results if ds.Modality == "OT"]
    assert captures and all(str(c.ImageComments).startswith("INCOMPLETE SERIES - ")
                            for c in captures)
    # The overlay and the key images (where the model left a region / found a slice) say so too.
    assert all("INCOMPLETE SERIES" in incompleteness_note(ds) for ds in results if ds.Modality in ("SEG", "KO"))
    assert node.db.latest_completion(uid).rule == "max_wait"
    assert "INCOMPLETE SERIES" in events(node, uid, "complete")[0]
    assert "INCOMPLETE SERIES" in events(node, uid, "analysis")[0]
    logged = log_data(node.db, timedelta(hours=1))  # what `ihd-node log` prints and gives as JSON
    (entry,) = [x for st in logged["studies"] for x in st["series"] if x["series_instance_uid"] == uid]
    assert entry["incomplete_series"].startswith("geometry: gap of 14.0 mm")
    assert "INCOMPLETE SERIES: " in format_log(logged)

    # The missing slice arrives: the revision is complete and says what it replaces.
    assert send_datasets([missing], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                         calling_aet="CT1") == [0]
    assert wait_until(lambda: node.db.latest_analysis(uid).revision == 2
                      and node.db.get_series(uid).state == "delivered")
    time.sleep(0.5)
    second = next(sr for sr in srs(pacs, study) if sr.SOPInstanceUID != first.SOPInstanceUID)
    assert second.CompletionFlag == "COMPLETE"
    assert f"replaces the INCOMPLETE SERIES result {first.SOPInstanceUID}" in summary(second)
    assert "INCOMPLETE SERIES -" not in summary(second) and "PRELIMINARY" not in summary(second)
    (entry,) = [x for st in log_data(node.db, timedelta(hours=1))["studies"] for x in st["series"]
                if x["series_instance_uid"] == uid]
    assert entry["incomplete_series"] is None
    ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


# ------------------------------------------------------------- the INCOMPLETE SERIES objects on their own


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (dicom3tools)")
def test_preliminary_sr_and_captures_say_so_and_stay_valid(tmp_path: Path) -> None:
    from test_report_common import dciodvfy, make_prediction, make_volume

    from ihd_node.report import build_results

    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    why = "geometry: gap of 10.0 mm between slices at 5.0 and 15.0 mm (about 1 slice(s) missing)"
    prediction = dataclasses.replace(make_prediction(6, {"intraparenchymal": [2, 3]}), incomplete=why)
    objects = build_results(volume, prediction, max_secondary_captures=2)
    assert objects.sr.CompletionFlag == "PARTIAL"
    assert summary(objects.sr).startswith(f"{INCOMPLETE_SERIES_LINE}: {why}. Intracranial hemorrhage")
    assert "not for diagnostic use" in summary(objects.sr).lower()
    assert objects.secondary_captures
    for k, ds in enumerate(objects.all()):
        path = tmp_path / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert not errors, "\n".join(errors)
    for sc in objects.secondary_captures:
        assert str(sc.ImageComments).startswith(f"{INCOMPLETE_SERIES_LINE}: {why}")
    complete = build_results(volume, make_prediction(6, {"intraparenchymal": [2, 3]}))
    assert complete.sr.CompletionFlag == "COMPLETE" and "INCOMPLETE" not in summary(complete.sr)
    # Burned in: the capture's pixels differ from the complete result's (an INCOMPLETE SERIES line heads the text).
    for prelim, final in zip(objects.secondary_captures, complete.secondary_captures, strict=True):
        a, b = prelim.pixel_array, final.pixel_array
        assert a.shape != b.shape or (a != b).any()
