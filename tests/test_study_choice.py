"""series.selection best_per_study: one result per study. The ranking (kernel from ConvolutionKernel, then
description, then image noise; axial; 2.5-5 mm before thinner; coverage), and the node end to end: a study
of topogram + brain-kernel + bone-kernel series in one association gives one SR, for the brain kernel; a
better series arriving later gives the study a new result."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from ihd_node.commands.log import format_log, log_data
from ihd_node.imaging.volume import slice_headers
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, send_datasets
from ihd_node.sim.phantom import PhantomSeries, make_series, write_series
from ihd_node.triage.choice import BONE, SOFT, UNKNOWN, kernel_of_name, profile, rank, why_lower
from tests.test_service import SR_CLASS, THRESHOLDS, wait_until
from tests.test_service import node_config as service_config

N = 12
STUDY = "1.2.826.0.1.3680043.8.498.7700001"


def node_config(root: Path, pacs: MiniPACS | None, **series: object):
    """The study choice under test ranks reconstructions of one 12-slice stretch of a head (same positions,
    other kernels and thicknesses); the completion evidence, which would hold each stretch for max_wait as
    a partial head, has its own tests (test_completion, reliability/test_fail_closed), so it is off here."""
    return service_config(root, pacs, check_geometry=False, check_coverage=False, **series)


@pytest.mark.parametrize(("kernel", "kind"), [
    ("FC21", SOFT), ("FC26", SOFT), ("FC30", BONE), ("FC81", BONE), ("H30s", SOFT), ("Hr38", SOFT),
    ("J70h", BONE), ("H60s", BONE), ("Br36d", SOFT), ("STANDARD", SOFT), ("SOFT", SOFT), ("BONE", BONE),
    ("BONEPLUS", BONE), ("UB", SOFT), ("YC", BONE), ("EDGE", BONE), ("XYZ", UNKNOWN), ("", UNKNOWN)])
def test_kernel_names(kernel: str, kind: str) -> None:
    assert kernel_of_name(kernel) == kind


def series_of(seed: int, number: int, description: str, kernel: str | None = None, **variation) -> PhantomSeries:
    """Reconstructions of one acquisition: the same seed gives the same head and slice positions."""
    series = make_series(seed, subtypes=["subdural"], n_slices=N, size=64, study_instance_uid=STUDY,
                         series_number=number, series_description=description, tilt_deg=0.0, **variation)
    for ds in series.datasets:
        if kernel is not None:
            ds.ConvolutionKernel = kernel
    return series


def profiled(series: PhantomSeries, folder: Path, noise: bool = False):
    return profile(slice_headers(write_series(series, folder)), measure_noise=noise)


def test_ranking_thickness_then_noise_when_nothing_names_the_kernel(tmp_path: Path) -> None:
    thick = profiled(series_of(60, 2, "HEAD", "FC21", slice_spacing=5.0), tmp_path / "a")
    thin = profiled(series_of(60, 3, "HEAD", "FC21", slice_spacing=1.25), tmp_path / "b")
    assert rank([thin, thick])[0] is thick
    assert "1.25 mm slices rank below the 5 mm" in why_lower(thin, thick)
    bone = profiled(series_of(60, 4, "HEAD", "FC30", slice_spacing=5.0), tmp_path / "c")
    assert rank([bone, thin])[0] is thin  # kernel before thickness
    # No kernel, same description: the image noise tells the sharp reconstruction from the smooth one.
    smooth = profiled(series_of(61, 5, "HEAD", None, noise_sigma=3.0), tmp_path / "d", noise=True)
    sharp = profiled(series_of(61, 6, "HEAD", None, noise_sigma=40.0), tmp_path / "e", noise=True)
    assert smooth.kernel == sharp.kernel == UNKNOWN and sharp.noise_hu > 3 * smooth.noise_hu
    assert rank([sharp, smooth])[0] is smooth and "image noise" in why_lower(sharp, smooth)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor.from_model(IhdModel(tiny_config()), THRESHOLDS, "tiny-random", "0")


def topogram(series: PhantomSeries) -> pydicom.Dataset:
    ds = pydicom.Dataset(series.datasets[0])
    ds.file_meta = series.datasets[0].file_meta.copy()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesNumber, ds.SeriesDescription = 1, "Topogram"
    return ds


def sr_series(pacs: MiniPACS) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(o.path) for o in pacs.objects(STUDY) if o.sop_class_uid == SR_CLASS]


def referenced_series(sr: pydicom.Dataset) -> str:
    return sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID


def test_one_association_three_series_one_sr_for_the_brain_kernel(tmp_path: Path, predictor: Predictor) -> None:
    brain = series_of(70, 2, "HEAD 5.0", "FC21", slice_spacing=5.0, noise_sigma=4.0)
    bone = series_of(70, 3, "HEAD 5.0", "FC30", slice_spacing=5.0, noise_sigma=40.0)
    scout = topogram(brain)
    datasets = [scout, *bone.datasets, *brain.datasets]  # as a scanner sends them: scout, then reconstructions
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_datasets(datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                 calling_aet="PACS") == [0] * len(datasets)
            uid = brain.series_instance_uid
            assert wait_until(lambda: node.db.get_series(uid).state == "delivered", 60), \
                node.db.get_series(uid).reason
            states = {u: (node.db.get_series(u).state, node.db.get_series(u).reason)
                      for u in (scout.SeriesInstanceUID, bone.series_instance_uid)}
            assert states[scout.SeriesInstanceUID] == ("ignored", "localizer (scout) series")
            state, reason = states[bone.series_instance_uid]
            assert state == "not_chosen"
            assert "bone kernel (ConvolutionKernel FC30)" in reason and "series 2 'HEAD 5.0'" in reason
            assert "soft-tissue kernel" in reason and "ConvolutionKernel FC21" in reason
            [sr] = sr_series(pacs)
            assert referenced_series(sr) == uid
            assert node.db.latest_analysis(bone.series_instance_uid) is None
            log = format_log(log_data(node.db, timedelta(hours=1)))
            assert "not_chosen" in log and "not chosen: bone kernel" in log
        finally:
            node.stop()


def test_a_better_series_arriving_later_gives_the_study_a_new_result(tmp_path: Path,
                                                                      predictor: Predictor) -> None:
    bone = series_of(71, 3, "HEAD 5.0", "FC30", slice_spacing=5.0)
    brain = series_of(71, 2, "HEAD 5.0", "FC21", slice_spacing=5.0)
    thin = series_of(71, 4, "HEAD 1.0", "FC21", slice_spacing=1.0)
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            def send(series: PhantomSeries) -> None:
                assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                     calling_aet="PACS") == [0] * N

            send(bone)  # alone, it is the best the study has
            assert wait_until(lambda: node.db.get_series(bone.series_instance_uid).state == "delivered", 60)
            [first] = sr_series(pacs)
            send(brain)
            assert wait_until(lambda: node.db.get_series(brain.series_instance_uid).state == "delivered", 60)
            srs = sr_series(pacs)
            assert len(srs) == 2
            [second] = [s for s in srs if s.SOPInstanceUID != first.SOPInstanceUID]
            assert referenced_series(second) == brain.series_instance_uid
            pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
            [chosen] = [e for e in _events(node, "chosen") if e.message.endswith("the study gets a new result")]
            assert "ranks above the analysed series 3 'HEAD 5.0'" in chosen.message
            send(thin)  # ranks below the brain series: recorded, not analysed
            assert wait_until(lambda: node.db.get_series(thin.series_instance_uid).state == "not_chosen", 60)
            assert "1 mm slices rank below the 5 mm" in node.db.get_series(thin.series_instance_uid).reason
            assert len(sr_series(pacs)) == 2
        finally:
            node.stop()


def _events(node: Node, kind: str) -> list:
    from sqlalchemy import select

    from ihd_node.store import Event

    with node.db.read_session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


def test_when_the_chosen_series_cannot_be_loaded_the_next_best_is_analysed(tmp_path: Path,
                                                                           predictor: Predictor) -> None:
    brain = series_of(72, 2, "HEAD 5.0", "FC21", slice_spacing=5.0)
    bone = series_of(72, 3, "HEAD 5.0", "FC30", slice_spacing=5.0)
    # The lowest slice (not among those the head check reads) has half its pixel data: the load fails.
    [broken] = [ds for ds in brain.datasets if ds.SOPInstanceUID == brain.sop_uids_sorted[0]]
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_datasets([*brain.datasets, *bone.datasets], host="127.0.0.1", port=node.port,
                                 called_aet="IHD_AI", calling_aet="PACS") == [0] * 2 * N
            assert wait_until(lambda: node.db.get_series(bone.series_instance_uid).state == "delivered", 60)
            assert node.db.get_series(brain.series_instance_uid).state == "failed"
            [sr] = sr_series(pacs)
            assert referenced_series(sr) == bone.series_instance_uid
        finally:
            node.stop()


def test_every_series_analyses_each_reconstruction(tmp_path: Path, predictor: Predictor) -> None:
    brain = series_of(73, 2, "HEAD 5.0", "FC21", slice_spacing=5.0)
    bone = series_of(73, 3, "HEAD 5.0", "FC30", slice_spacing=5.0)
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs, selection="every_series"), predictor=predictor).start()
        try:
            assert send_datasets([*brain.datasets, *bone.datasets], host="127.0.0.1", port=node.port,
                                 called_aet="IHD_AI", calling_aet="PACS") == [0] * 2 * N
            assert wait_until(lambda: all(node.db.get_series(s.series_instance_uid).state == "delivered"
                                          for s in (brain, bone)), 60)
            assert sorted(map(referenced_series, sr_series(pacs))) == sorted(
                [brain.series_instance_uid, bone.series_instance_uid])
        finally:
            node.stop()
