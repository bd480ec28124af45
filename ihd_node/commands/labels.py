"""`ihd-node labels import FILE.csv` and `ihd-node labels list`: the radiologist's reads into the log database,
and what is there.

Import checks every row first (ihd_node.monitoring.labels) and adds the reads in one transaction only when
every row is good: exit status 2 with each bad row's line number and fix otherwise, nothing imported.
"""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Any

from ihd_node.classes import CLASSES
from ihd_node.commands.readout import iso, open_existing, plural, text_table
from ihd_node.errors import UserError
from ihd_node.monitoring.labels import MAX_BYTES, MAX_PROBLEMS_SHOWN, LabelProblem, import_reads
from ihd_node.store import Read

SHORT = {"present": "yes", "absent": "no", "not_assessed": "n/a"}


def labels_command(args: Any) -> int:
    if args.labels_command == "import":
        return import_labels(args.file, args.config, max_bytes=int(args.max_mb * 1024 * 1024), dry_run=args.dry_run)
    return list_labels(args.config, study=args.study, as_json=args.json)


def _report(where: str, problems: list[LabelProblem]) -> None:
    for p in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"{where}:{p.line}: {p.message}" if p.line is not None else f"{where}: {p.message}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"{where}: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems", file=sys.stderr)
    lines = {p.line for p in problems if p.line is not None}
    print(f"{where}: nothing imported: {plural(len(problems), 'problem')}"
          + (f" on {plural(len(lines), 'line')}" if lines else "") + "; fix them and import the file again",
          file=sys.stderr)


def import_labels(file: str, config: str, *, max_bytes: int = MAX_BYTES, dry_run: bool = False) -> int:
    path = Path(file)
    if not path.is_file():
        raise UserError(f"{file}: no such file; give the path of the CSV file of reads")
    size = path.stat().st_size
    if size > max_bytes:  # checked before reading it into memory
        _report(file, [LabelProblem(None, f"the file is {size / 2**20:.1f} MB, more than the {max_bytes / 2**20:g} MB "
                                          "limit; split it into smaller files or raise the limit with --max-mb")])
        return 2
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{file}: cannot read it ({exc.strerror}); check the path and its permissions") from None
    db = open_existing(config)
    try:
        done = import_reads(db, data, file=str(path.resolve()), user=_os_user(), check_only=dry_run,
                            max_bytes=max_bytes)
    finally:
        db.close()
    if done.problems:
        _report(file, done.problems)
        return 2
    reads, studies, replaced = done.reads, done.studies, done.replaced
    if dry_run:
        print(f"{file}: all {plural(len(reads), 'read')} of {plural(studies, 'study', 'studies')} are good "
              f"({replaced} would replace an earlier read); nothing imported (--dry-run)")
        return 0
    print(f"{file}: imported {plural(len(reads), 'read')} of {plural(studies, 'study', 'studies')}"
          + (f"; {replaced} replaced an earlier read (kept in the history: `ihd-node labels list --study UID`)"
             if replaced else ""))
    return 0


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        return None


def _read_json(r: Read) -> dict[str, Any]:
    return {"id": r.id, "study_instance_uid": r.study_instance_uid, "accession_number": r.accession_number,
            "finding": r.finding, "value": r.value, "reader": r.reader, "read_at": iso(r.read_at),
            "source": r.source, "entered_by": r.entered_by, "entered_at": iso(r.entered_at), "current": r.current,
            "superseded_by": r.superseded_by}


def list_labels(config: str, *, study: str | None = None, as_json: bool = False) -> int:
    db = open_existing(config)
    try:
        if study is not None:
            history = db.read_history(study)
            if as_json:
                print(json.dumps({"study_instance_uid": study, "reads": [_read_json(r) for r in history]}, indent=2))
                return 0
            if not history:
                print(f"no reads for study {study}")
                return 0
            print(f"Reads of study {study} (accession {history[0].accession_number or '-'}), newest first:")
            rows = [[r.id, r.finding, r.value, "current" if r.current else f"replaced by {r.superseded_by}",
                     r.reader, (iso(r.read_at) or "-")[:16], r.source, r.entered_by, (iso(r.entered_at) or "")[:19]]
                    for r in history]
            print("\n".join(text_table(["id", "finding", "value", "status", "reader", "read at", "source",
                                        "entered by", "entered at (UTC)"], rows)))
            return 0
        current = db.current_reads()
        if as_json:
            print(json.dumps({"studies": {uid: {f: _read_json(r) for f, r in reads.items()}
                                          for uid, reads in current.items()}}, indent=2))
            return 0
        if not current:
            print("no reads yet; import them with `ihd-node labels import FILE.csv --config ...`")
            return 0
        print(f"Current reads of {plural(len(current), 'study', 'studies')} (yes present, no absent, "
              "n/a not assessed, - no read):")
        rows = []
        for uid, reads in sorted(current.items(), key=lambda kv: max(r.entered_at for r in kv[1].values())):
            acc = next(iter(reads.values())).accession_number
            rows.append([uid, acc] + [SHORT[reads[c].value] if c in reads else None for c in CLASSES])
        print("\n".join(text_table(["study", "accession", *[c[:8] for c in CLASSES]], rows)))
        return 0
    finally:
        db.close()
