"""destinations: the four kinds (dicom, hl7, fhir, dicomweb) and what check-config says about each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ihd_node.config import ConfigError, load_config
from ihd_node.config.outbound import DicomDestination, DicomWebDestination, FhirDestination, Hl7Destination


def write(tmp_path: Path, destinations: list[dict]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "data")}, "destinations": destinations}))
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "ihd-node"
    return subprocess.run([str(exe), "check-config", str(path)], capture_output=True, text=True, timeout=60)


def test_every_kind_with_a_complete_example(tmp_path: Path) -> None:
    token = tmp_path / "ehr.token"
    token.write_text("s3cret\n")
    password = tmp_path / "pacs.pass"
    password.write_text("pw\n")
    config = load_config(write(tmp_path, [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},  # no kind: dicom
        {"name": "ris", "kind": "hl7", "host": "ris.example", "port": 2575, "sending_facility": "RAD",
         "receiving_application": "RIS", "receiving_facility": "HOSP", "include_patient_data": False,
         "placer_order_number": "accession", "filler_order_number": "sr_uid"},
        {"name": "ehr", "kind": "fhir", "url": "https://fhir.example/r4/", "auth": {"token_file": "ehr.token"},
         "patient_identifier_system": "urn:oid:1.2.3"},
        {"name": "cloud", "kind": "dicomweb", "url": "https://pacs.example/dicom-web",
         "auth": {"username": "node", "password_file": str(password)}, "send_captures": False},
    ]))
    pacs, ris, ehr, cloud = config.destinations
    assert isinstance(pacs, DicomDestination) and pacs.kind == "dicom"
    assert isinstance(ris, Hl7Destination) and ris.port == 2575 and ris.include_patient_data is False
    assert isinstance(ehr, FhirDestination) and ehr.url == "https://fhir.example/r4"  # no trailing slash
    assert ehr.auth.token_file == token  # relative to the config file
    assert isinstance(cloud, DicomWebDestination) and cloud.auth.username == "node"
    assert [d.name for d in config.dicom_destinations] == ["pacs"]
    proc = check_config(tmp_path / "config.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "ris = HL7 ORU to ris.example:2575" in proc.stdout and "ehr = FHIR to https://fhir.example/r4" in proc.stdout


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "ris", "kind": "hl8", "host": "h", "port": 1},
     'destinations[0].kind in {cfg}: "hl8" is not a destination kind; use one of dicom, hl7, fhir, dicomweb'),
    ({"name": "ris", "kind": "hl7", "host": "h", "sending_facility": "RAD", "receiving_application": "RIS",
      "receiving_facility": "HOSP"},
     "destinations[0].port in {cfg}: missing; add it, e.g. `port: 2575`"),
    ({"name": "ris", "kind": "hl7", "host": "h", "port": 1, "sending_facility": "RADIOLOGY DEPARTMENT EAST",
      "receiving_application": "RIS", "receiving_facility": "HOSP"},
     'destinations[0].sending_facility in {cfg}: "RADIOLOGY DEPARTMENT EAST" must have 1 to 20 characters'),
    ({"name": "ehr", "kind": "fhir"},
     'destinations[0].url in {cfg}: missing; add it, e.g. `url: "https://fhir.hospital.example/r4"`'),
    ({"name": "ehr", "kind": "fhir", "url": "fhir.example/r4"},
     'destinations[0].url in {cfg}: "fhir.example/r4" is not an http:// or https:// URL'),
    ({"name": "ehr", "kind": "fhir", "url": "https://f.example", "auth": {"token_file": "gone.token"}},
     "destinations[0].auth.token_file in {cfg}: \"gone.token\" does not exist or is not a file; give the path"),
    ({"name": "ris", "kind": "hl7", "host": "h", "port": 1, "url": "http://x.example"},
     "unknown key `destinations[0].url` in {cfg}"),
    ({"name": "cloud", "kind": "dicomweb", "url": "https://p.example", "auth": {"username": "u"}},
     "destinations[0].auth in {cfg}: username and password_file go together"),
])
def test_check_config_names_the_cause_and_the_fix(tmp_path: Path, entry: dict, message: str) -> None:
    path = write(tmp_path, [entry])
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message.format(cfg=path, tmp=tmp_path) in str(err.value)
    proc = check_config(path)
    assert proc.returncode == 2 and message.format(cfg=path, tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_or_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"token_file .*is empty; put the token"):
        load_config(write(tmp_path, [{"name": "e", "kind": "fhir", "url": "https://f.example",
                                      "auth": {"token_file": str(empty)}}]))
    if os.geteuid() == 0:  # root reads any mode: take a file whose read fails for everyone
        unreadable = Path("/proc/self/mem")
    else:
        unreadable = tmp_path / "locked.token"
        unreadable.write_text("t")
        unreadable.chmod(0)
    with pytest.raises(ConfigError, match=r"token_file .*cannot be read .*make it readable by the ihd-node user"):
        load_config(write(tmp_path, [{"name": "e", "kind": "fhir", "url": "https://f.example",
                                      "auth": {"token_file": str(unreadable)}}]))
