"""Round trip through the node: Japanese and Korean studies in by C-STORE, SR and captures out to a PACS.

What comes back must name the patient exactly as the source does (pydicom-decoded), validate with
dciodvfy, and agree with the source on every patient/study attribute (dcentvfy). The thresholds make a
subtype present while `any` stays below its own threshold: the log database must then say ICH present.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from test_report_common import dciodvfy, needs

from ihd_node.classes import CLASSES
from ihd_node.config import default_config
from ihd_node.dicom.mini_pacs import MiniPACS, free_port, send_files
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.phantom import make_series, write_series
from ihd_node.service import Node

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
N_SLICES = 12
# Subtypes always present, `any` never by its own threshold: only the consistency rule makes ICH present.
THRESHOLDS = {**dict.fromkeys(CLASSES, 0.0), "any": 1.0}
STUDIES = {
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部単純CT", "+0900"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "두부 CT", "+0900"),
}


def localise(paths: list[Path], terms: list[str], name: str, description: str, timezone: str) -> None:
    """The phantom as a Japanese/Korean scanner would send it: character set, names, identity attributes."""
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RADIOLOGY"
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = terms
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        ds.StudyDescription = description
        ds.IssuerOfPatientID = "HOSPITAL"
        ds.IssuerOfAccessionNumberSequence = [issuer]
        ds.PatientAge, ds.PatientWeight, ds.PatientSex = "042Y", "61.5", "M"
        ds.TimezoneOffsetFromUTC = timezone
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("roundtrip")
    torch.manual_seed(0)
    predictor = Predictor.from_model(IhdModel(tiny_config()), THRESHOLDS, "tiny-random", "0")
    sources: dict[str, list[Path]] = {}
    series_uids: dict[str, str] = {}
    study_uids: dict[str, str] = {}
    for seed, (key, (terms, name, description, tz)) in enumerate(STUDIES.items(), start=31):
        phantom = make_series(seed, subtypes=["subdural"], n_slices=N_SLICES, size=96)
        sources[key] = write_series(phantom, root / key)
        localise(sources[key], terms, name, description, tz)
        series_uids[key], study_uids[key] = phantom.series_instance_uid, phantom.study_instance_uid
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        config = default_config(
            root / "node", node={"ae_title": "IHD_AI", "host": "127.0.0.1", "port": free_port()},
            series={"quiet_seconds": 0.3, "max_wait_seconds": 30.0}, storage={"min_free_mb": 0},
            analysis={"max_secondary_captures": 2},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0})
        node = Node(config, predictor=predictor).start()
        try:
            files = [p for paths in sources.values() for p in paths]
            assert send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0] * len(files)
            states = {}
            import time

            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                states = {k: node.db.get_series(u).state for k, u in series_uids.items()}
                if all(s in ("delivered", "failed", "ignored") for s in states.values()):
                    break
                time.sleep(0.1)
            results = {k: [pydicom.dcmread(o.path) for o in pacs.objects(study_uids[k])] for k in STUDIES}
            paths = {k: [o.path for o in pacs.objects(study_uids[k])] for k in STUDIES}
            analyses = {k: node.db.latest_analysis(u) for k, u in series_uids.items()}
        finally:
            node.stop()
    return {"sources": sources, "states": states, "results": results, "paths": paths, "analyses": analyses}


@pytest.mark.parametrize("key", list(STUDIES))
def test_results_name_the_patient_as_the_source(roundtrip, key):
    assert roundtrip["states"][key] == "delivered", roundtrip["states"]
    source = pydicom.dcmread(roundtrip["sources"][key][0])
    results = roundtrip["results"][key]
    assert {ds.Modality for ds in results} == {"SR", "OT"} and len(results) == 4  # SR, summary, 2 slices
    for ds in results:
        assert str(ds.PatientName) == str(source.PatientName) == STUDIES[key][1]
        assert str(ds.ReferringPhysicianName) == STUDIES[key][1]


@pytest.mark.parametrize("key", list(STUDIES))
def test_log_database_follows_the_consistency_rule(roundtrip, key):
    analysis = roundtrip["analyses"][key]
    assert analysis.p_any < 1.0  # `any` alone never reaches 1.0 ...
    assert "any" in analysis.positives()  # ... but a subtype present makes ICH present


@needs("dciodvfy")
@pytest.mark.parametrize("key", list(STUDIES))
def test_results_validate(roundtrip, key):
    for path in roundtrip["paths"][key]:
        errors, _ = dciodvfy(path)
        assert not errors, "\n".join(errors)
