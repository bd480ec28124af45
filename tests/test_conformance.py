"""The DICOM Conformance Statement against the running node: what it lists is what the node negotiates.

`ihd-node conformance` writes the statement for a config; a node started with the same config is asked by
dcmtk `storescu` (an association-negotiation profile proposing one abstract syntax + transfer syntax per
presentation context, many per association) for every listed pair and for unlisted ones; each context's
answer (its `-d` dump) must be accepted exactly when the statement lists it. The SCU side: the real sender,
`echo` and the C-FIND count associate with a pynetdicom acceptor that records what they propose, which must
be the statement's proposed-context tables row by row.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main
from ihd_node.config import load_config
from ihd_node.conformance import Specimen, build_specimen, read_markdown_table
from ihd_node.delivery.sender import count_series_instances, echo, send_files
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.node.wiring import Node
from ihd_node.report.codes import FINDING_CODES
from ihd_node.sim.mini_pacs import free_port

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")

AET = "CONF_AI"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
# Not accepted by the node (abstract syntaxes: query, worklist, commitment, a private class; transfer syntaxes:
# video, JPEG XL, JPEG 2000 Part 2): the node must reject each, and the statement must not list it.
UNLISTED_CLASSES = ["1.2.840.10008.5.1.4.31", "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.2",
                    "1.2.840.10008.1.20.1", "1.2.826.0.1.3680043.8.498.77.1"]
UNLISTED_SYNTAXES = ["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.107",
                     "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.92"]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk is slow on loopback without it (Nagle)
PS32_HEADINGS = ["Conformance Statement Overview", "1 Introduction", "1.1 Revision History", "1.2 Audience",
                 "1.3 Remarks", "2 Networking", "2.1 Implementation Model", "2.1.1 Application Data Flow",
                 "2.1.2 Functional Definition of AEs", "2.1.3 Sequencing of Real-World Activities",
                 "2.2 AE Specifications", "2.2.1.1 SOP Classes", "2.2.1.2 Association Policies",
                 "2.2.1.2.2 Number of Associations", "2.2.1.2.3 Asynchronous Nature",
                 "2.2.1.2.4 Implementation Identifying Information", "2.2.1.3 Association Initiation Policy",
                 "2.2.1.4 Association Acceptance Policy", "2.3 Network Interfaces", "2.4 Configuration",
                 "2.4.1 AE Title/Presentation Address Mapping", "2.4.2 Parameters", "3 Media Interchange",
                 "4 Support of Character Sets", "5 Security", "6 Annexes", "6.1 IOD Contents",
                 "6.2 Data Dictionary of Private Attributes", "6.3 Coded Terminology and Templates",
                 "6.7 IHE Integration Statement"]


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return build_specimen()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's config file: its own AE title, port and a destination with count_instances."""
    root = tmp_path_factory.mktemp("conformance")
    config = {"node": {"ae_title": AET, "host": "127.0.0.1", "port": free_port(), "max_associations": 4},
              "storage": {"dir": str(root / "state"), "min_free_mb": 0}, "web": {"port": 0},
              "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
                                "sr_class": "comprehensive", "count_instances": True}]}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def statement(site: Path) -> str:
    out = site.parent / "statement.md"
    assert main(["conformance", "--config", str(site), "--out", str(out)]) == 0
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def node(site: Path) -> Iterator[Node]:
    torch.manual_seed(0)
    predictor = Predictor.from_model(IhdModel(tiny_config()), dict.fromkeys(CLASSES, 0.5), "tiny-random", "0")
    running = Node(load_config(site), predictor=predictor).start()
    yield running
    running.stop()


def listed_scp_contexts(text: str) -> dict[str, set[str]]:
    """Abstract syntax -> transfer syntaxes, from the accepted-contexts table and its TS list tables."""
    lists = {}
    for key in re.findall(r"<!-- table: (scp-ts-\w+) -->", text):
        lists[f"TS list {key.rsplit('-', 1)[1]}"] = {r["Transfer Syntax UID"] for r in read_markdown_table(text, key)}
    return {r["Abstract Syntax UID"]: lists[r["Transfer Syntaxes"]] for r in read_markdown_table(text, "scp-contexts")}


def negotiate(proposals: list[tuple[str, str]], port: int, folder: Path, ct_file: Path) -> list[bool]:
    """Propose each (abstract syntax, transfer syntax) in a context of its own with dcmtk storescu, 127 per
    association; whether the node accepted each, read from storescu's dump of the A-ASSOCIATE-AC."""
    answers: list[bool] = []
    for start in range(0, len(proposals), 127):
        chunk = proposals[start:start + 127]
        syntaxes = list(dict.fromkeys(t for _, t in chunk))
        lines = ["[[TransferSyntaxes]]"]
        for i, ts in enumerate(syntaxes):
            lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
        lines += ["[[PresentationContexts]]", "[PCS]"]
        lines += [f"PresentationContext{n} = {a}\\TS{syntaxes.index(t)}" for n, (a, t) in enumerate(chunk, start=1)]
        lines += ["[[Profiles]]", "[PROFILE]", "PresentationContexts = PCS"]
        cfg = folder / f"profile{start}.cfg"
        cfg.write_text("\n".join(lines) + "\n", encoding="ascii")
        run = subprocess.run(["storescu", "-d", "-nh", "-aet", "DCMTK", "-aec", AET, "-xf", str(cfg), "PROFILE",
                              "127.0.0.1", str(port), str(ct_file)], capture_output=True, text=True, timeout=60,
                             env=DCMTK_ENV)
        output = run.stdout + run.stderr
        ac = output[output.index("BEGIN A-ASSOCIATE-AC"):]
        results = re.findall(r"Context ID:\s+(\d+) \(([^)]+)\)", ac)
        assert [int(i) for i, _ in results] == list(range(1, 2 * len(chunk), 2)), output[-2000:]
        answers += [what == "Accepted" for _, what in results]
    return answers


def test_the_node_accepts_exactly_the_listed_contexts(statement: str, node: Node, tmp_path: Path,
                                                      specimen: Specimen) -> None:
    listed = listed_scp_contexts(statement)
    assert len(listed) > 100 and CT in listed and EXPLICIT in listed[CT]
    proposals = [(a, t) for a, syntaxes in listed.items() for t in sorted(syntaxes)]
    unlisted = [(a, EXPLICIT) for a in UNLISTED_CLASSES] + [(CT, t) for t in UNLISTED_SYNTAXES]
    unlisted += [("1.2.840.10008.1.1", "1.2.840.10008.1.2.4.50")]  # Verification in JPEG: not in its list
    for a, t in unlisted:
        assert t not in listed.get(a, set()), f"{a} {t} is listed; pick another unlisted pair"
    ct_file = tmp_path / "ct.dcm"
    ds = specimen.results.sr  # any file storescu can read; it is sent only if its context was accepted
    ds.save_as(ct_file, enforce_file_format=True)
    answers = negotiate(proposals + unlisted, node.port, tmp_path, ct_file)
    wrong = [(p, "accepted" if a else "rejected") for p, a in zip(proposals + unlisted, answers, strict=True)
             if a != (p in proposals)]
    assert not wrong, f"{len(wrong)} contexts disagree with the statement, e.g. {wrong[:5]}"
    assert sum(answers) == len(proposals) and len(proposals) > 2000


def test_echoscu_and_the_implementation_identity(statement: str, node: Node) -> None:
    run = subprocess.run(["echoscu", "-d", "-pts", "38", "-aec", AET, "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=30, env=DCMTK_ENV)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Received Echo Response (Success)" in output, output[-2000:]
    ids = {r["Item"]: r["Value"] for r in read_markdown_table(statement, "implementation")}
    ac = output[output.index("BEGIN A-ASSOCIATE-AC"):]
    assert f"Their Implementation Class UID:    {ids['Implementation Class UID']}" in ac
    assert f"Their Implementation Version Name: {ids['Implementation Version Name']}" in ac


class Acceptor:
    """A pynetdicom SCP that accepts storage, echo and C-FIND and records every association's proposals."""

    def __init__(self) -> None:
        self.proposed: list[list[tuple[str, list[str]]]] = []
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2", EXPLICIT])
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, lambda e: 0x0000),
                    (evt.EVT_C_FIND, self._find)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _requested(self, event: evt.Event) -> None:
        self.proposed.append([(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                              for cx in event.assoc.requestor.requested_contexts])

    @staticmethod
    def _find(event: evt.Event) -> Iterator[tuple[int, object]]:
        yield 0x0000, None


def table_contexts(text: str, key: str) -> list[tuple[str, list[str]]]:
    return [(r["Abstract Syntax UID"], r["Transfer Syntax UIDs"].split("\n")) for r in read_markdown_table(text, key)]


def test_the_sender_proposes_what_the_statement_lists(statement: str, site: Path, specimen: Specimen,
                                                      tmp_path: Path) -> None:
    config = load_config(site)
    acceptor = Acceptor()
    try:
        dest = config.destination("pacs").model_copy(update={"port": acceptor.port})
        paths = []
        for i, ds in enumerate(specimen.objects()):
            paths.append(tmp_path / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        results = send_files(AET, dest, paths)
        assert [r.status for r in results] == [0] * len(paths)
        assert echo(AET, dest)[0]
        assert count_series_instances(dest, AET, "1.2.3", "1.2.3.4") == 0
    finally:
        acceptor.server.shutdown()
    sent, echoed, counted = acceptor.proposed
    headings = re.findall(r"^###### 2\.2\.1\.3\.\d+ Activity - (.+)$", statement, re.M)
    assert headings == ["Send results (sr_class comprehensive)", "Verify destinations",
                        "Count a series' instances at the PACS"]
    assert table_contexts(statement, "scu-contexts-1") == sent
    assert table_contexts(statement, "scu-contexts-2") == echoed
    assert table_contexts(statement, "scu-contexts-3") == counted
    # The SR goes out in the class this site asks first, and the simpler one; never the 3D class it skips.
    assert "1.2.840.10008.5.1.4.1.1.88.34" not in {a for a, _ in sent}


def test_markdown_and_html_carry_the_ps32_layout_and_this_site(statement: str, site: Path) -> None:
    headings = re.findall(r"^#{2,7} (.+)$", statement, re.M)
    missing = [h for h in PS32_HEADINGS if not any(x == h or x.startswith(h + " ") for x in headings)]
    assert not missing, missing
    assert "NOT FOR DIAGNOSTIC USE" in statement and "synthetic head CTs" in statement
    local = read_markdown_table(statement, "local-ae")[0]
    config = load_config(site)
    assert (local["AE Title"], local["TCP Port"]) == (AET, str(config.node.port))
    codes = {(r["Coding Scheme"], r["Code Value"]) for r in read_markdown_table(statement, "codes")}
    assert {(c.scheme_designator, c.value) for c in FINDING_CODES.values()} <= codes
    assert {("SCT", "52101004"), ("SCT", "272519000")} <= codes  # Present and Absent
    templates = {r["Template"] for r in read_markdown_table(statement, "templates")}
    assert {"TID 1500", "TID 1501", "TID 1410", "TID 1411", "TID 1600", "TID 4019"} <= templates
    out = site.parent / "statement.html"
    assert main(["conformance", "--config", str(site), "--out", str(out)]) == 0
    root = ET.fromstring(out.read_text(encoding="utf-8").removeprefix("<!DOCTYPE html>\n"))  # well-formed
    tables = {t.get("id"): t for t in root.iter("table")}
    assert len(tables["scp-contexts"].find("tbody")) == len(read_markdown_table(statement, "scp-contexts"))
    assert [h.text for h in root.iter("h2")][:2] == ["Conformance Statement Overview", "1 Introduction"]


def test_an_unknown_output_format_is_refused_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--out", str(tmp_path / "statement.pdf")]) == 2
    assert "name the file .md (Markdown) or .html" in capsys.readouterr().err
    assert not (tmp_path / "statement.pdf").exists()
