"""`ihd-node labels import` against malformed files: every bad row named with its line number and the fix,
exit status 2, nothing imported; and the good files Excel and friends write (BOM, CRLF, semicolons).

The log database is a real one made by the store (studies recorded as the receiver records them); the command
runs in-process through the CLI's main(), and once as `python -m ihd_node` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ihd_node.audit import schema_errors
from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main
from ihd_node.store import Database, NewRead, UnknownStudies, open_database

ROOT = Path(__file__).resolve().parents[1]
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDIES = {"1.2.826.0.1.19.1": "ACC1", "1.2.826.0.1.19.2": "ACC2", "1.2.826.0.1.19.3": "ACC3",
           "1.2.826.0.1.19.4": "TWICE", "1.2.826.0.1.19.5": "TWICE"}
HEADER = "study_instance_uid,finding,present,reader,read_at\n"


@pytest.fixture
def node(tmp_path: Path) -> tuple[str, Database]:
    url = f"sqlite:///{tmp_path / 'state' / 'ihd.sqlite'}"
    db = open_database(url)
    for k, (uid, acc) in enumerate(STUDIES.items()):
        db.record_instance(study_instance_uid=uid, series_instance_uid=f"{uid}.1", sop_instance_uid=f"{uid}.1.1",
                           sop_class_uid=CT, path=f"/spool/{k}.dcm", size=1, sha256=str(k), accession_number=acc)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "state")}, "database": {"url": url}}))
    yield str(config), db
    db.close()


def run(config: str, path: Path, *extra: str) -> int:
    return main(["labels", "import", str(path), "--config", config, *extra])


def refused(capsys: pytest.CaptureFixture[str], db: Database, config: str, path: Path, *extra: str) -> str:
    """Import `path`: it must fail with exit status 2 and leave no read behind; returns the error text."""
    assert run(config, path, *extra) == 2
    err = capsys.readouterr().err
    assert "nothing imported" in err and "Traceback" not in err
    assert db.read_history() == []
    return err


def good_rows(n: int = 3) -> str:
    uids = list(STUDIES)[:n]
    return "".join(f"{u},{c},{int(c == 'subdural')},Dr A,2026-11-30T10:00:00+01:00\n" for u in uids for c in CLASSES)


def test_a_good_file_is_imported_whole(node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, db = node
    path = tmp_path / "reads.csv"
    path.write_text(HEADER + good_rows())
    assert run(config, path, "--dry-run") == 0
    assert "all 18 reads of 3 studies are good" in capsys.readouterr().out and db.read_history() == []
    assert run(config, path) == 0
    assert "imported 18 reads of 3 studies" in capsys.readouterr().out
    current = db.current_reads()
    assert len(current) == 3 and all(len(v) == 6 for v in current.values())
    read = current["1.2.826.0.1.19.1"]["subdural"]
    assert (read.value, read.reader, read.source) == ("present", "Dr A", "csv")
    assert read.read_at == datetime(2026, 11, 30, 9, 0, tzinfo=UTC) and read.accession_number == "ACC1"
    assert current["1.2.826.0.1.19.1"]["any"].value == "absent"
    [audit] = db.audit_messages(event="labels-import")  # IHE ATNA 110107 Import: the file and its 3 studies
    assert audit.event_id == "110107" and schema_errors(audit.xml) == []
    assert all(uid in audit.xml for uid in list(STUDIES)[:3]) and str(path.resolve()) in audit.xml


@pytest.mark.parametrize("text, line, words", [
    ("study_instance_uid,finding,presnt\n1.2.826.0.1.19.1,any,1\n", 1, "unknown column(s) 'presnt'"),
    ("study_instance_uid,finding\n1.2.826.0.1.19.1,any\n", 1, "missing column(s) present"),
    ("finding,present\nany,1\n", 1, "missing column(s) study_instance_uid (or accession_number)"),
    (HEADER + "1.2.826.0.1.19.1,any,1,,\n1.2.826.0.1.19.1,bleeding,1,,\n", 3,
     "finding 'bleeding' is not one of any, epidural"),
    (HEADER + "1.2.826.0.1.19.1,Subdural ,yes,,\n", 2, "present 'yes': use 1 (present), 0 (absent) or not_assessed"),
    (HEADER + "1.2.826.0.1.19.1,any,1,,30/11/2026\n", 2, "read_at '30/11/2026' is not an ISO 8601 date"),
    (HEADER + "1.2.826.0.1.19.1,any,1,,2999-01-01\n", 2, "read_at '2999-01-01' is in the future"),
    (HEADER + "1.2.826.0.1.19.1,any,1\n", 2, "3 fields, the header has 5"),
    (HEADER + "1.2.826.0.1.19.9,any,1,,\n", 2, "unknown study 1.2.826.0.1.19.9: the node never received it"),
    (HEADER + "1.2.826.0.1.19.1,any,1,,\n1.2.826.0.1.19.2,any,1,,\n1.2.826.0.1.19.1,any,0,,\n", 4,
     "study 1.2.826.0.1.19.1, finding any is already on line 2; keep one row per study and finding"),
    ("accession_number,finding,present\nTWICE,any,1\n", 2, "accession number TWICE belongs to 2 studies"),
    ("accession_number,finding,present\nNOPE,any,1\n", 2, "no study with accession number NOPE"),
    ("study_instance_uid,accession_number,finding,present\n1.2.826.0.1.19.1,ACC2,any,1\n", 2,
     "accession_number ACC2 does not match study 1.2.826.0.1.19.1"),
    (HEADER, None, "the file has a header but no reads"),
    ("", None, "no header row"),
])
def test_a_bad_file_is_refused_with_the_line_and_the_fix(node, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         text: str, line: int | None, words: str) -> None:
    config, db = node
    path = tmp_path / "reads.csv"
    path.write_text(text)
    err = refused(capsys, db, config, path)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert any(ln.startswith(where) and words in ln for ln in err.splitlines()), err


def test_one_bad_row_among_many_good_ones_stops_them_all_and_every_bad_row_is_named(
        node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, db = node
    rows = good_rows(3).splitlines(keepends=True)
    rows[4] = "1.2.826.0.1.19.2,subdurall,1,,\n"  # line 6
    rows[10] = "1.2.826.0.1.19.8,any,1,,\n"  # line 12
    path = tmp_path / "reads.csv"
    path.write_text(HEADER + "".join(rows))
    err = refused(capsys, db, config, path)
    assert f"{path}:6: finding 'subdurall'" in err and f"{path}:12: unknown study 1.2.826.0.1.19.8" in err
    assert "nothing imported: 2 problems on 2 lines" in err


def test_a_50_mb_file_is_refused_before_it_is_read(node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, db = node
    path = tmp_path / "big.csv"
    line = "1.2.826.0.1.19.1,any,1,Dr A,2026-11-30\n"
    with path.open("w") as fh:
        fh.write(HEADER)
        fh.write(line * (50 * 1024 * 1024 // len(line) + 1))
    assert path.stat().st_size > 50 * 1024 * 1024
    err = refused(capsys, db, config, path)
    assert "the file is 50.0 MB, more than the 10 MB limit; split it" in err and "--max-mb" in err


def test_a_file_that_is_not_utf8_is_refused(node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, db = node
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "1.2.826.0.1.19.1,any,1,Dr Müller,\n").encode("latin-1"))
    err = refused(capsys, db, config, path)
    assert f"{path}:2: not UTF-8 text (byte 0xFC); save the file as UTF-8 CSV" in err


@pytest.mark.parametrize("encoding, newline, delimiter", [("utf-8-sig", "\r\n", ","), ("utf-8", "\r\n", ";"),
                                                          ("utf-8-sig", "\n", ";")])
def test_excel_files_with_bom_crlf_or_semicolons_are_read(node, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          encoding: str, newline: str, delimiter: str) -> None:
    config, db = node
    text = ("Study_Instance_UID ; Finding;Present;Reader\n" if delimiter == ";"
            else "Study_Instance_UID , Finding,Present,Reader\n")
    text += "1.2.826.0.1.19.3;subarachnoid;1;Dr Müller\n1.2.826.0.1.19.3;any;1;Dr Müller\n\n"
    path = tmp_path / "excel.csv"
    path.write_bytes(text.replace(";", delimiter).replace("\n", newline).encode(encoding))
    assert run(config, path) == 0, capsys.readouterr().err
    reads = db.current_reads()["1.2.826.0.1.19.3"]
    assert sorted(reads) == ["any", "subarachnoid"] and reads["any"].reader == "Dr Müller"


def test_not_assessed_and_a_later_read_replace_the_current_one(node, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config, db = node
    path = tmp_path / "first.csv"
    path.write_text("accession_number,finding,present\nACC1,epidural,not_assessed\nACC1,any,0\n")
    assert run(config, path) == 0
    path.write_text("accession_number,finding,present,reader\nACC1,epidural,1,Dr B\n")
    assert run(config, path) == 0
    assert "1 replaced an earlier read" in capsys.readouterr().out
    history = db.read_history("1.2.826.0.1.19.1")
    epidural = [r for r in history if r.finding == "epidural"]
    assert [(r.value, r.current) for r in epidural] == [("present", True), ("not_assessed", False)]
    assert epidural[1].superseded_by == epidural[0].id
    assert db.current_reads()["1.2.826.0.1.19.1"]["epidural"].reader == "Dr B"
    assert main(["labels", "list", "--config", config]) == 0
    listing = capsys.readouterr().out
    [row] = [ln for ln in listing.splitlines() if ln.startswith("1.2.826.0.1.19.1")]
    assert row.split() == ["1.2.826.0.1.19.1", "ACC1", "no", "yes", "-", "-", "-", "-"]


def test_the_store_adds_all_or_nothing(node) -> None:
    _, db = node
    with pytest.raises(UnknownStudies, match="1.2.9"):
        db.add_reads([NewRead("1.2.826.0.1.19.1", "any", "present"), NewRead("1.2.9", "any", "absent")],
                     source="console", entered_by="admin")
    with pytest.raises(ValueError, match="unknown read value"):
        db.add_reads([NewRead("1.2.826.0.1.19.1", "any", "maybe")], source="console", entered_by="admin")
    assert db.read_history() == []


def test_the_command_as_an_admin_runs_it(node, tmp_path: Path) -> None:
    config, db = node
    path = tmp_path / "reads.csv"
    path.write_text(HEADER + "1.2.826.0.1.19.2,any,2,,\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ihd_node", "labels", "import", str(path), "--config", config],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}:2: present '2': use 1 (present), 0 (absent) or not_assessed",
        f"{path}: nothing imported: 1 problem on 1 line; fix them and import the file again"]
    assert db.read_history() == []
