"""The result as the RIS and the EHR read it: the HL7 v2.5.1 ORU^R01 and the FHIR R4 transaction Bundle.

Each message is built from a real SR (report stage, small CT series written by pydicom) and checked by
libraries nobody here wrote: hl7apy parses and validates every ORU at its strict level as ORU_R01 v2.5.1,
fhir.resources (R4B models) validates every resource and the bundle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import hl7
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from test_report_common import make_prediction, write_ct_series

from ihd_node.classes import CLASSES
from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.clinical import (
    ClinicalResult,
    SliceRef,
    clinical_result,
    clinical_result_from_sr,
    from_json,
    slices_text,
    to_json,
)
from ihd_node.report.codes import FINDING_CODES
from ihd_node.report.fhir import FhirSettings, build_bundle, bundle_bytes
from ihd_node.report.hl7 import Hl7Addressing, build_oru, escape, person_name
from ihd_node.report.sr import summary_text

NOW = dt.datetime(2026, 12, 6, 8, 30, 15, tzinfo=dt.UTC)
ADDRESSING = Hl7Addressing("IHD-NODE", "RADIOLOGY", "RIS", "HOSPITAL")
JAPANESE = (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう")
KOREAN = (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동")


def localise(paths: list[Path], terms: list[str] | None, name: str | None) -> None:
    """Source images as a site would send them: issuers, order numbers, a procedure code, a time zone."""
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RADIOLOGY"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID, qualifiers.UniversalEntityIDType = "1.2.826.0.1.3680043.9.7777", "ISO"
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = "CTHEAD", "99RIS", "CT head"
    request = Dataset()
    request.RequestedProcedureID = "RP-77"
    for path in paths:
        ds = pydicom.dcmread(path)
        if terms:
            ds.SpecificCharacterSet = terms
        if name is not None:
            ds.PatientName = name
        ds.IssuerOfPatientID = "HOSPITAL"
        ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
        ds.IssuerOfAccessionNumberSequence = [issuer]
        ds.ProcedureCodeSequence = [procedure]
        ds.RequestAttributesSequence = [request]
        ds.PlacerOrderNumberImagingServiceRequest = "PLACER-1"
        ds.TimezoneOffsetFromUTC = "+0900"
        ds.save_as(path, enforce_file_format=True)


def make_result(root: Path, positive: dict[str, list[int]] | None, *, terms: list[str] | None = None,
                name: str | None = None, site: bool = True, revision: int = 0) -> tuple[ClinicalResult, Dataset]:
    """A ClinicalResult from an SR built by the report stage and read back from disk."""
    paths = write_ct_series(root / "src", n=6, size=64, bleed_slices=tuple(positive.get("subdural", []))
                            if positive else ())
    if site:
        localise(paths, terms, name)
    volume = load_volume(paths)
    prediction = make_prediction(6, positive, size=64)
    results = build_results(volume, prediction, revision=revision)
    path = root / "sr.dcm"
    results.sr.save_as(path, enforce_file_format=True)
    sr = pydicom.dcmread(path)
    return clinical_result(sr, prediction, volume, None, summary_text(volume, prediction)), sr


@pytest.fixture(scope="module")
def positive(tmp_path_factory) -> tuple[ClinicalResult, Dataset]:
    return make_result(tmp_path_factory.mktemp("positive"), {"subdural": [2, 3], "subarachnoid": [3]})


@pytest.fixture(scope="module")
def negative(tmp_path_factory) -> tuple[ClinicalResult, Dataset]:
    return make_result(tmp_path_factory.mktemp("negative"), None, site=False)


def strict(message: str):
    """hl7apy's strict parse and validation as ORU_R01 v2.5.1 (raises on any violation)."""
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.name == "ORU_R01" and parsed.msh.msh_12.to_er7() == "2.5.1"
    assert parsed.validate() is True
    return parsed


def segments(message: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in message.split("\r") if s.startswith(name + "|")]


# ---- the clinical result ----------------------------------------------------------------------------


def test_clinical_result_reads_the_sr_and_the_prediction(positive):
    result, sr = positive
    assert result.sr_sop_instance_uid == sr.SOPInstanceUID and result.study_instance_uid == sr.StudyInstanceUID
    assert (result.patient_id, result.issuer_of_patient_id, result.accession_number) == ("RPT001", "HOSPITAL", "ACC1")
    assert result.issuer_universal_id == "1.2.826.0.1.3680043.9.7777" and result.issuer_universal_id_type == "ISO"
    assert result.placer_order_number == "PLACER-1" and result.requested_procedure_id == "RP-77"
    assert result.procedure_code is not None and result.procedure_code.value == "CTHEAD"
    assert [f.cls for f in result.findings] == list(CLASSES)
    assert result.positive_classes == ["any", "subarachnoid", "subdural"]
    subdural = result.finding("subdural")
    # write_ct_series numbers instances in reverse: slices 2 and 3 are images 4 and 3
    assert sorted(s.instance_number for s in subdural.slices) == [3, 4]
    assert slices_text(subdural.slices) == "images 3-4 of series 3"
    assert all(f.tracking_uid for f in result.findings) and len({f.tracking_uid for f in result.findings}) == 6
    assert result.result_datetime.utcoffset() == dt.timedelta(hours=9)
    assert result.study_datetime() == dt.datetime(2024, 1, 2, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=9)))


def test_clinical_result_round_trips_through_json(positive, tmp_path):
    result, _ = positive
    again = from_json(to_json(result))
    assert again == result
    japanese, _ = make_result(tmp_path, {"subdural": [2]}, terms=JAPANESE[0], name=JAPANESE[1])
    assert from_json(to_json(japanese)) == japanese and "山田" in to_json(japanese)


def test_clinical_result_from_the_sr_alone(positive):
    """What a retraction can rebuild from the SR file: all but what only the source images hold."""
    result, sr = positive
    rebuilt = clinical_result_from_sr(sr)
    expected = replace_result(
        result, placer_order_number="", filler_order_number="", requested_procedure_id="", series_number=None,
        findings=tuple(dataclasses.replace(f, slices=tuple(SliceRef(s.sop_instance_uid, None, None, None)
                                                           for s in f.slices)) for f in result.findings))
    assert rebuilt == expected
    message = build_oru(rebuilt, ADDRESSING, status="retracted", control_id="IHD0010", now=NOW, reason="wrong")
    strict(message)
    validate_fhir(build_bundle(rebuilt, FhirSettings(), status="retracted", now=NOW, reason="wrong"))
    with pytest.raises(ValueError, match="not an SR this node made"):
        clinical_result_from_sr(Dataset())


def test_multiframe_source_names_frames(tmp_path):
    """An Enhanced CT source: the images of a finding are frames of one instance, in messages and the SR."""
    from enhanced_ct import enhanced_from_slices

    paths = write_ct_series(tmp_path / "classic", n=6, size=64)
    enhanced = tmp_path / "enhanced.dcm"
    enhanced_from_slices([pydicom.dcmread(p) for p in paths]).save_as(enhanced, enforce_file_format=True)
    volume = load_volume([enhanced])
    prediction = make_prediction(6, {"subdural": [2, 3]}, size=64)
    results = build_results(volume, prediction)
    result = clinical_result(results.sr, prediction, volume, None, summary_text(volume, prediction))
    subdural = result.finding("subdural")
    assert [s.frame_number for s in subdural.slices] == [3, 4]
    assert {s.sop_instance_uid for s in subdural.slices} == {volume.slices[0].sop_instance_uid}
    number = subdural.slices[0].instance_number
    assert slices_text(subdural.slices).startswith(f"image {number} frames 3-4")
    assert [s.frame_number for s in clinical_result_from_sr(results.sr).finding("subdural").slices] == [3, 4]
    strict(build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0011", now=NOW))


def test_slice_labels():
    assert SliceRef("1.2", 14, None, 2).label() == "image 14 of series 2"
    assert SliceRef("1.2", 1, 7, 3).label() == "image 1 frame 7 of series 3"
    frames = [SliceRef("1.2", 1, f, 3) for f in (7, 8, 9, 12)]
    assert slices_text(frames) == "image 1 frames 7-9, 12 of series 3"


# ---- HL7 ORU^R01 ------------------------------------------------------------------------------------


def test_positive_oru_validates_strictly_with_stat_priority(positive):
    result, _ = positive
    message = build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0001", now=NOW)
    parsed = strict(message)
    msh = segments(message, "MSH")[0]
    assert msh[8] == "ORU^R01^ORU_R01" and msh[9] == "IHD0001" and msh[17] == "UNICODE UTF-8"
    pid = segments(message, "PID")[0]
    assert pid[3] == "RPT001^^^HOSPITAL&1.2.826.0.1.3680043.9.7777&ISO"
    assert (pid[5], pid[7], pid[8]) == ("Test^Report", "19700101", "O")
    obr = segments(message, "OBR")[0]
    assert obr[2] == "ACC1" and obr[3] == f"{result.sr_sop_instance_uid}^IHD-NODE"
    assert obr[4] == "CTHEAD^CT head^99RIS" and obr[18] == "ACC1" and obr[19] == "RP-77"
    assert obr[7] == "20240102101500+0900" and obr[25] == "P"
    assert segments(message, "TQ1")[0][9].startswith("S^")
    obx = segments(message, "OBX")
    coded = [o for o in obx if o[2] == "CWE"]
    assert len(coded) == 6  # one coded finding per class
    for o, cls in zip(coded, CLASSES, strict=True):
        assert o[3].split("^")[0] == FINDING_CODES[cls].value
        assert o[5] == ("52101004^Present^SCT" if result.finding(cls).present else "272519000^Absent^SCT")
    numbers = {o[4]: float(o[5]) for o in obx if o[2] == "NM"}
    assert numbers == {str(k): result.findings[k - 1].probability for k in range(1, 7)}
    images = [o[5] for o in obx if o[3].startswith("121112^")]
    assert images == ["Intracranial hemorrhage: images 3-4 of series 3",
                      "Subarachnoid hemorrhage: image 3 of series 3", "Subdural hemorrhage: images 3-4 of series 3"]
    assert any(o[5] == result.sr_sop_instance_uid for o in obx)
    assert any(o[5] == result.study_instance_uid for o in obx)
    assert all(o[11] == "P" for o in obx)
    assert any("NOT FOR DIAGNOSTIC USE" in n[3] for n in segments(message, "NTE"))
    # hl7apy's own reading: the groups it found and the summary text
    observations = parsed.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation
    assert len(observations) == len(obx)


def test_negative_oru_is_routine(negative):
    result, _ = negative
    message = build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0002", now=NOW)
    strict(message)
    assert segments(message, "TQ1")[0][9].startswith("R^")
    assert all(o[5] == "272519000^Absent^SCT" for o in segments(message, "OBX") if o[2] == "CWE")
    assert not [o for o in segments(message, "OBX") if o[3].startswith("121112^")]
    pid = segments(message, "PID")[0]
    assert pid[3] == "RPT001"  # no issuer in this study: no assigning authority


def test_revision_and_retraction(positive):
    result, _ = positive
    revised = build_oru(result, ADDRESSING, status="revised", control_id="IHD0003", now=NOW)
    strict(revised)
    assert segments(revised, "OBR")[0][25] == "C"
    preliminary = build_oru(replace_result(result, incomplete=True), ADDRESSING, status="revised",
                            control_id="IHD0008", now=NOW)
    strict(preliminary)
    assert any(n[3].startswith("PRELIMINARY") for n in segments(preliminary, "NTE"))
    assert all(o[11] == "C" for o in segments(revised, "OBX"))
    retracted = build_oru(result, ADDRESSING, status="retracted", control_id="IHD0004", now=NOW,
                          reason="wrong patient | see ^RIS^")
    strict(retracted)
    assert segments(retracted, "OBR")[0][25] == "C"
    assert segments(retracted, "OBR")[0][22] == "20261206083015+0000"
    assert all(o[11] == "W" for o in segments(retracted, "OBX"))
    notes = [n[3] for n in segments(retracted, "NTE")]
    assert any(n.startswith("RESULT WITHDRAWN") and "wrong patient \\F\\ see \\S\\RIS\\S\\" in n for n in notes)
    with pytest.raises(ValueError, match="reason"):
        build_oru(result, ADDRESSING, status="retracted", control_id="X", now=NOW)


@pytest.mark.parametrize("terms,name", [JAPANESE, KOREAN], ids=["japanese", "korean"])
def test_japanese_and_korean_names(tmp_path, terms, name):
    result, sr = make_result(tmp_path, {"subdural": [2]}, terms=terms, name=name)
    assert list(sr.SpecificCharacterSet) == terms  # the SR keeps the source's character set
    assert result.patient_name == name
    message = build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0005", now=NOW)
    parsed = strict(message)
    alphabetic, ideographic, phonetic = (g.split("^") for g in name.split("="))
    expected = "~".join(f"{g[0]}^{g[1]}^^^^^^{code}" for g, code in
                        ((alphabetic, "A"), (ideographic, "I"), (phonetic, "P")))
    assert segments(message, "PID")[0][5] == expected
    pid = parsed.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_5[1].xpn_1.to_er7() == ideographic[0] and pid.pid_5[2].xpn_8.to_er7() == "P"
    assert message.encode("utf-8").decode("utf-8") == message


def test_without_patient_data(positive):
    result, _ = positive
    addressing = Hl7Addressing("IHD-NODE", "RADIOLOGY", "RIS", "HOSPITAL", include_patient_data=False,
                               placer_order_number="placer", filler_order_number="accession")
    message = build_oru(result, addressing, status="preliminary", control_id="IHD0006", now=NOW)
    strict(message)
    pid = segments(message, "PID")[0]
    assert pid[5] == '""' and pid[7] == "" and pid[3].startswith("RPT001^")
    assert "Test" not in message and "19700101" not in message
    orc = segments(message, "ORC")[0]
    assert orc[2] == "PLACER-1" and orc[3] == "ACC1^IHD-NODE"


def test_every_text_is_escaped(positive):
    result, _ = positive
    nasty = "Bleed | left ^ right & both ~ either \\ none. " + "More words to make it long. " * 12
    tricky = replace_result(result, summary=nasty, patient_name="O'Brien&Co^Mary|Ann", accession_number="A|1^2")
    message = build_oru(tricky, ADDRESSING, status="preliminary", control_id="IHD0007", now=NOW)
    parsed = strict(message)
    assert escape("| ^ & ~ \\") == "\\F\\ \\S\\ \\T\\ \\R\\ \\E\\"
    assert segments(message, "PID")[0][5] == "O'Brien\\T\\Co^Mary\\F\\Ann"
    assert segments(message, "OBR")[0][18] == "A\\F\\1\\S\\2"
    summary = next(o for o in segments(message, "OBX") if o[3].startswith("121106^"))
    repetitions = summary[5].split("~")
    assert len(repetitions) > 1 and all(len(r) <= 199 for r in repetitions)
    assert " ".join(repetitions).startswith("Bleed \\F\\ left \\S\\ right \\T\\ both \\R\\ either \\E\\ none.")
    # hl7apy finds the repetitions; the hl7 package unescapes them back to the text we meant
    obx = [o for o in parsed.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation
           if o.obx.obx_3.to_er7().startswith("121106^")][0].obx
    assert [rep.to_er7() for rep in obx.obx_5] == repetitions
    other = hl7.parse(message)
    assert " ".join(other.unescape(rep) for rep in repetitions) == nasty.strip()


def test_what_hl7_cannot_carry_is_refused_by_name(positive):
    result, _ = positive
    with pytest.raises(ValueError, match="sending_application"):
        Hl7Addressing("A" * 21, "RADIOLOGY", "RIS", "HOSPITAL")
    with pytest.raises(ValueError, match="placer_order_number"):
        Hl7Addressing("IHD", "RADIOLOGY", "RIS", "HOSPITAL", placer_order_number="visit")
    with pytest.raises(ValueError, match="control ID"):
        build_oru(result, ADDRESSING, status="preliminary", control_id="X" * 21, now=NOW)
    with pytest.raises(ValueError, match="Patient ID"):
        build_oru(replace_result(result, patient_id=""), ADDRESSING, status="preliminary", control_id="X", now=NOW)
    long_issuer = "REGIONAL HOSPITAL NORTH WEST"
    with pytest.raises(ValueError, match="Universal Entity ID"):
        build_oru(replace_result(result, issuer_of_patient_id=long_issuer, issuer_universal_id=""), ADDRESSING,
                  status="preliminary", control_id="X", now=NOW)
    # with a universal ID the authority is still named, by its OID alone
    message = build_oru(replace_result(result, issuer_of_patient_id=long_issuer), ADDRESSING,
                        status="preliminary", control_id="X", now=NOW)
    strict(message)
    assert segments(message, "PID")[0][3] == "RPT001^^^&1.2.826.0.1.3680043.9.7777&ISO"


def test_person_names():
    assert person_name("Doe^John^Q^Dr^Jr") == "Doe^John^Q^Jr^Dr"  # HL7 puts the suffix before the prefix
    assert person_name("") == '""'
    assert person_name("=山田^太郎") == "山田^太郎"


def replace_result(result: ClinicalResult, **changes) -> ClinicalResult:
    from dataclasses import replace

    return replace(result, **changes)


# ---- FHIR -------------------------------------------------------------------------------------------


def bundle_json(bundle: dict) -> str:
    return json.dumps(bundle, sort_keys=True, ensure_ascii=False)


def validate_fhir(bundle: dict) -> None:
    """fhir.resources (R4B models) validates the bundle and each resource on its own."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    Bundle.model_validate(json.loads(bundle_json(bundle)))
    models = {"DiagnosticReport": DiagnosticReport, "Observation": Observation}
    for entry in bundle["entry"]:
        models[entry["resource"]["resourceType"]].model_validate(entry["resource"])


def resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_positive_bundle(positive):
    result, _ = positive
    bundle = build_bundle(result, FhirSettings(), status="preliminary", now=NOW)
    validate_fhir(bundle)
    assert bundle["type"] == "transaction" and len(bundle["entry"]) == 7
    (report,) = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    assert report["status"] == "preliminary" and all(o["status"] == "preliminary" for o in observations)
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{result.sr_sop_instance_uid}"}.items() <= \
        report["identifier"][1].items()
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{result.study_instance_uid}"
    patient = report["subject"]["identifier"]
    assert patient["value"] == "RPT001" and patient["system"] == "urn:oid:1.2.826.0.1.3680043.9.7777"
    assert report["subject"]["display"] == "Test, Report"
    assert "not for diagnostic use" in report["conclusion"].lower()
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == \
        [FINDING_CODES["subarachnoid"].value, FINDING_CODES["subdural"].value]
    assert report["effectiveDateTime"] == "2024-01-02T10:15:00+09:00"
    assert [o["code"]["coding"][0]["code"] for o in observations] == [FINDING_CODES[c].value for c in CLASSES]
    for o, cls in zip(observations, CLASSES, strict=True):
        finding = result.finding(cls)
        assert o["valueCodeableConcept"]["coding"][0]["code"] == ("52101004" if finding.present else "272519000")
        quantity = o["component"][0]["valueQuantity"]
        assert quantity["value"] == finding.probability and quantity["code"] == "1"
        assert o["identifier"][1]["value"] == f"urn:oid:{finding.tracking_uid}"
    # every reference to an Observation is one of the bundle's fullUrls; every request is a conditional update
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert {r["reference"] for r in report["result"]} <= full_urls and len(full_urls) == 7
    for entry in bundle["entry"]:
        request, official = entry["request"], entry["resource"]["identifier"][0]
        assert request["method"] == "PUT"
        kind = entry["resource"]["resourceType"]
        assert request["url"] == f"{kind}?identifier={official['system']}|{official['value']}"
        assert entry["fullUrl"] == official["value"]
    # the validator is not vacuous: a time without its zone, or a report without a code, is refused
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    broken = json.loads(bundle_json(bundle))
    broken["entry"][3]["resource"]["effectiveDateTime"] = "2024-01-02T10:15:00"
    with pytest.raises(ValidationError):
        Bundle.model_validate(broken)
    del broken["entry"][0]["resource"]["code"]
    with pytest.raises(ValidationError):
        validate_fhir(broken)


def test_bundle_is_deterministic_and_keyed_by_series(positive, tmp_path):
    result, _ = positive
    first = bundle_bytes(build_bundle(result, FhirSettings(), status="preliminary", now=NOW))
    assert first == bundle_bytes(build_bundle(result, FhirSettings(), status="preliminary", now=NOW))
    # a revision of the same series updates the same resources (same keys, new SR identifier, amended)
    revised = build_bundle(replace_result(result, sr_sop_instance_uid="1.2.3.4", revision=1), FhirSettings(),
                           status="revised", now=NOW)
    validate_fhir(revised)
    original = json.loads(first)
    assert [e["request"]["url"] for e in revised["entry"]] == [e["request"]["url"] for e in original["entry"]]
    assert all(e["resource"]["status"] == "amended" for e in revised["entry"])
    assert resources(revised, "DiagnosticReport")[0]["identifier"][1]["value"] == "urn:oid:1.2.3.4"


def test_negative_bundle_and_retraction(negative):
    result, _ = negative
    bundle = build_bundle(result, FhirSettings(patient_identifier_system="https://ehr.example/mrn",
                                               include_patient_data=False), status="preliminary", now=NOW)
    validate_fhir(bundle)
    (report,) = resources(bundle, "DiagnosticReport")
    assert "conclusionCode" not in report
    assert report["subject"] == {"type": "Patient", "identifier": {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
        "value": "RPT001", "system": "https://ehr.example/mrn"}}
    assert "Test" not in bundle_json(bundle) and "19700101" not in bundle_json(bundle)
    assert all(o["valueCodeableConcept"]["coding"][0]["code"] == "272519000" for o in resources(bundle, "Observation"))
    retracted = build_bundle(result, FhirSettings(), status="retracted", now=NOW, reason="wrong study")
    validate_fhir(retracted)
    assert all(e["resource"]["status"] == "entered-in-error" for e in retracted["entry"])
    (report,) = resources(retracted, "DiagnosticReport")
    assert report["conclusion"].startswith("RESULT WITHDRAWN (entered in error): wrong study.")
    assert report["issued"] == "2026-12-06T08:30:15+00:00"
    with pytest.raises(ValueError, match="reason"):
        build_bundle(result, FhirSettings(), status="retracted", now=NOW)


def test_bundle_with_japanese_name(tmp_path):
    result, _ = make_result(tmp_path, {"subdural": [2]}, terms=JAPANESE[0], name=JAPANESE[1])
    bundle = build_bundle(result, FhirSettings(), status="preliminary", now=NOW)
    validate_fhir(bundle)
    assert resources(bundle, "DiagnosticReport")[0]["subject"]["display"] == "Yamada, Tarou (山田 太郎)"
    assert "山田".encode() in bundle_bytes(bundle)
