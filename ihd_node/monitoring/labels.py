"""The radiologist's reads as a CSV file (`ihd-node labels import`): read, check every row, resolve studies.

Columns (header row, any order, case and surrounding spaces ignored): `study_instance_uid` and/or
`accession_number`, `finding`, `present`, and optionally `reader`, `read_at`. UTF-8 (a BOM, as Excel
writes, is accepted), comma- or semicolon-separated, LF or CRLF line ends. Every problem is collected with
its line number and the fix; the caller imports nothing unless there is none.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ihd_node.audit import StudyObject, events
from ihd_node.classes import CLASSES
from ihd_node.store import Database, NewRead, StudyRef

MAX_BYTES = 10 * 1024 * 1024  # a year of reads of a busy department is far less; a bigger file is a wrong file
COLUMNS = ("study_instance_uid", "accession_number", "finding", "present", "reader", "read_at")
PRESENT_VALUES = {"1": "present", "0": "absent", "not_assessed": "not_assessed"}
MAX_PROBLEMS_SHOWN = 200


@dataclass(frozen=True)
class LabelRow:
    line: int  # in the file, 1 = the header
    study_instance_uid: str | None
    accession_number: str | None
    finding: str
    value: str  # present / absent / not_assessed
    reader: str | None
    read_at: datetime | None


@dataclass(frozen=True)
class LabelProblem:
    line: int | None  # None: the file as a whole
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ParsedLabels:
    rows: list[LabelRow]
    problems: list[LabelProblem]


def _decode(data: bytes) -> tuple[str | None, LabelProblem | None]:
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return None, LabelProblem(line, f"not UTF-8 text (byte 0x{data[exc.start]:02X}); save the file as "
                                        "UTF-8 CSV (Excel: Save As > 'CSV UTF-8 (Comma delimited)')")


def parse_read_at(text: str, now: datetime) -> datetime:
    """ISO 8601 date or date and time; without a zone it is the node's local time. Raises ValueError."""
    value = datetime.fromisoformat(text.strip())
    value = value.astimezone() if value.tzinfo is None else value
    if value > now + timedelta(days=1):
        raise ValueError("in the future")
    return value.astimezone(UTC)


def parse_labels_csv(data: bytes, *, max_bytes: int = MAX_BYTES, now: datetime | None = None) -> ParsedLabels:
    """Read and check a reads CSV (without looking at the database: resolve_labels does that)."""
    now = now or datetime.now(UTC)
    if len(data) > max_bytes:
        return ParsedLabels([], [LabelProblem(None, f"the file is {len(data) / 2**20:.1f} MB, more than the "
                                                    f"{max_bytes / 2**20:g} MB limit; split it into smaller files "
                                                    "or raise the limit with --max-mb")])
    text, problem = _decode(data)
    if text is None:
        return ParsedLabels([], [problem] if problem else [])
    first = text.split("\n", 1)[0]
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return ParsedLabels([], [LabelProblem(1, f"unreadable header ({exc}); the first row must name the columns")])
    if not header or not any(h.strip() for h in header):
        return ParsedLabels([], [LabelProblem(1 if header is not None else None,
                                              "no header row; the first row must name the columns: "
                                              "study_instance_uid (or accession_number), finding, present, "
                                              "and optionally reader, read_at")])
    names = [h.strip().lower() for h in header]
    problems: list[LabelProblem] = []
    unknown = [h for h in names if h not in COLUMNS]
    doubled = sorted({h for h in names if names.count(h) > 1})
    missing = [c for c in ("finding", "present") if c not in names]
    if "study_instance_uid" not in names and "accession_number" not in names:
        missing.insert(0, "study_instance_uid (or accession_number)")
    if unknown:
        problems.append(LabelProblem(1, f"unknown column(s) {', '.join(repr(h) for h in unknown)}; the columns are "
                                        f"{', '.join(COLUMNS)}"))
    if doubled:
        problems.append(LabelProblem(1, f"column(s) {', '.join(doubled)} named twice; keep one of each"))
    if missing:
        problems.append(LabelProblem(1, f"missing column(s) {', '.join(missing)}; add them to the header row"))
    if problems:
        return ParsedLabels([], problems)
    index = {h: i for i, h in enumerate(names)}
    rows: list[LabelRow] = []
    try:
        for record in reader:
            line = reader.line_num
            if not record or not any(v.strip() for v in record):
                continue  # blank lines (Excel leaves some at the end)
            row, row_problems = _row(record, line, index, len(names), now)
            problems.extend(row_problems)
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        problems.append(LabelProblem(reader.line_num, f"unreadable CSV ({exc}); check the quotes on this line"))
    if not rows and not problems:
        problems.append(LabelProblem(None, "the file has a header but no reads; add one row per study and finding"))
    return ParsedLabels(rows, problems)


def _row(record: list[str], line: int, index: dict[str, int], width: int, now: datetime
         ) -> tuple[LabelRow | None, list[LabelProblem]]:
    problems: list[LabelProblem] = []

    def problem(message: str) -> None:
        problems.append(LabelProblem(line, message))

    if len(record) != width:
        problem(f"{len(record)} fields, the header has {width}; every row needs the header's columns "
                "(a comma inside a value needs quotes)")
        return None, problems

    def get(name: str) -> str:
        return record[index[name]].strip() if name in index else ""

    uid, accession = get("study_instance_uid") or None, get("accession_number") or None
    if uid is None and accession is None:
        problem("no study_instance_uid and no accession_number; give one of them")
    finding = get("finding").lower()
    if finding not in CLASSES:
        shown = repr(get("finding")) if get("finding") else "empty"
        problem(f"finding {shown} is not one of {', '.join(CLASSES)}")
    present = get("present").lower()
    value = PRESENT_VALUES.get(present)
    if value is None:
        shown = repr(get("present")) if get("present") else "empty"
        problem(f"present {shown}: use 1 (present), 0 (absent) or not_assessed")
    reader = get("reader") or None
    if reader is not None and len(reader) > 128:
        problem(f"reader is {len(reader)} characters; at most 128")
    read_at = None
    if get("read_at"):
        try:
            read_at = parse_read_at(get("read_at"), now)
        except ValueError as exc:
            why = "is in the future" if str(exc) == "in the future" else "is not an ISO 8601 date"
            problem(f"read_at {get('read_at')!r} {why}; write e.g. 2026-11-30 or 2026-11-30T14:05:00+01:00")
    if problems or value is None:
        return None, problems
    return LabelRow(line, uid, accession, finding, value, reader, read_at), problems


def resolve_labels(parsed: ParsedLabels,
                   find_studies: Callable[..., tuple[dict[str, StudyRef], dict[str, list[StudyRef]]]],
                   ) -> tuple[list[NewRead], list[LabelProblem]]:
    """Each row's study (by UID, else by accession number) from the log database, and the duplicates:
    (the reads to add, every problem). `find_studies` is Database.find_studies."""
    problems = list(parsed.problems)
    by_uid, by_acc = find_studies({r.study_instance_uid for r in parsed.rows if r.study_instance_uid},
                                  {r.accession_number for r in parsed.rows if r.accession_number})
    reads: list[NewRead] = []
    first_line: dict[tuple[str, str], int] = {}
    for r in parsed.rows:
        uid = None
        if r.study_instance_uid is not None:
            ref = by_uid.get(r.study_instance_uid)
            if ref is None:
                problems.append(LabelProblem(r.line, f"unknown study {r.study_instance_uid}: the node never received "
                                                     "it; check the StudyInstanceUID (or leave the row out)"))
            elif r.accession_number is not None and ref.accession_number != r.accession_number:
                problems.append(LabelProblem(r.line, f"accession_number {r.accession_number} does not match study "
                                                     f"{r.study_instance_uid} (its accession number is "
                                                     f"{ref.accession_number or 'empty'}); correct either"))
            else:
                uid = ref.study_instance_uid
        else:
            refs = by_acc.get(r.accession_number or "", [])
            if not refs:
                problems.append(LabelProblem(r.line, f"unknown study: no study with accession number "
                                                     f"{r.accession_number}; check it, or give study_instance_uid"))
            elif len(refs) > 1:
                problems.append(LabelProblem(r.line, f"accession number {r.accession_number} belongs to "
                                                     f"{len(refs)} studies; give study_instance_uid instead"))
            else:
                uid = refs[0].study_instance_uid
        if uid is None:
            continue
        key = (uid, r.finding)
        if key in first_line:
            problems.append(LabelProblem(r.line, f"study {uid}, finding {r.finding} is already on line "
                                                 f"{first_line[key]}; keep one row per study and finding"))
            continue
        first_line[key] = r.line
        reads.append(NewRead(uid, r.finding, r.value, r.reader, r.read_at))
    problems.sort(key=lambda p: (p.line or 0))
    return reads, problems


@dataclass(frozen=True)
class LabelImport:
    """What importing one file of reads did (or, checking only, would do)."""

    reads: list[NewRead]
    problems: list[LabelProblem]  # any: nothing was imported
    studies: int
    replaced: int  # reads that replace a current one (kept in the history)
    imported: bool


def import_reads(db: Database, data: bytes, *, file: str, user: str | None, check_only: bool = False,
                 max_bytes: int = MAX_BYTES) -> LabelImport:
    """The one import of a file of reads (`ihd-node labels import` and the console's upload): every row checked,
    then all added in one transaction with an audit message naming `user`, or nothing."""
    reads, problems = resolve_labels(parse_labels_csv(data, max_bytes=max_bytes), db.find_studies)
    uids = sorted({r.study_instance_uid for r in reads})
    if problems:
        return LabelImport(reads, problems, len(uids), 0, False)
    before = db.current_reads(set(uids))
    replaced = sum(1 for r in reads if r.finding in before.get(r.study_instance_uid, {}))
    if check_only:
        return LabelImport(reads, [], len(uids), replaced, False)
    db.add_reads(reads, source="csv", entered_by=user)
    db.audit(events.labels_import(user, file, [StudyObject(uid) for uid in uids], count=len(reads)))
    return LabelImport(reads, [], len(uids), replaced, True)
