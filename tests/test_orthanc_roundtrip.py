"""The real round trip with Orthanc as the PACS, and the shipped default model.

Orthanc holds a phantom study, sends it to the node with POST /modalities/ai/store, and the SR, the
Grad-CAM secondary captures, the Segmentation and the key images must appear in the same study in Orthanc,
pass dciodvfy, and the SR must name the phantom's hemorrhage subtype as present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from heads import full_head
from loopback import destination, node_config, wait_finished
from orthanc import ORTHANC_BINARY, Orthanc

from ihd_node.imaging.headers import CT_IMAGE_STORAGE
from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT
from ihd_node.node.wiring import Node
from ihd_node.report.kos import KOS_SOP_CLASS as KEY_OBJECT_SELECTION_STORAGE
from ihd_node.report.seg import SEG_SOP_CLASS as SEGMENTATION_STORAGE
from ihd_node.report.sr import FINDING_CODES
from ihd_node.sim.mini_pacs import free_port
from ihd_node.sim.phantom import write_series

pytestmark = [
    pytest.mark.skipif(ORTHANC_BINARY is None,
                       reason="Orthanc is not installed (Debian package orthanc; .ci/run installs it)"),
    pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the shipped default model is missing"),
]
SUBTYPE = "subdural"


# Skull base to vertex at 5.4 mm, as the shipped model saw in training; completion evidence as shipped.
HEAD_SLICES = 36


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_orthanc_sends_a_study_and_gets_sr_and_secondary_captures_back(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", ai_ae_title="IHD_AI", ai_port=node_port).start()
    node = None
    try:
        config = node_config(
            tmp_path / "node", [destination("orthanc", orthanc.aet, orthanc.dicom_port)], port=node_port,
            series={"quiet_seconds": 1})
        node = Node(config).start()

        series = full_head(101, [SUBTYPE], n_slices=HEAD_SLICES, size=512)
        files = write_series(series, tmp_path / "study")
        study_id = {orthanc.upload(f)["ParentStudy"] for f in files}.pop()
        assert len(orthanc.get(f"/studies/{study_id}/instances")) == len(files)

        orthanc.post("/modalities/ai/store", {"Resources": [study_id], "Synchronous": True})
        state = wait_finished(node, series.series_instance_uid, 120)
        assert state is not None and state.state == "delivered", state
        instances = orthanc.get(f"/studies/{study_id}/instances")
        results = [i for i in instances  # our outputs: SR and Secondary Capture objects, not the CT slices
                   if orthanc.get(f"/instances/{i['ID']}/tags?simplify")["SOPClassUID"] != CT_IMAGE_STORAGE]
        assert len(instances) > len(files) and len(results) == len(instances) - len(files)

        sr_path, stored = None, set()
        for item in results:
            path = tmp_path / "from-orthanc" / f"{item['ID']}.dcm"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(orthanc.download(item["ID"]))
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == series.study_instance_uid  # filed into the same study
            assert dciodvfy_errors(path) == [] if shutil.which("dciodvfy") else True
            if ds.Modality == "SR":
                sr_path = path
            elif ds.Modality in ("SEG", "KO"):
                stored.add(str(ds.SOPClassUID))
            else:
                assert ds.BurnedInAnnotation == "YES"
                assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sr_path is not None
        # The overlay and the key images went out and were stored (the sender proposes their SOP classes).
        assert stored == {SEGMENTATION_STORAGE, KEY_OBJECT_SELECTION_STORAGE}, stored
        if shutil.which("dsrdump"):
            text = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True).stdout
            meaning = FINDING_CODES[SUBTYPE].meaning
            present = [line for line in text.splitlines() if meaning in line and "Present" in line]
            assert present, f"the SR does not name {meaning} as present:\n{text}"
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
