"""The radiologist's reads (issue 19) and the rows local performance compares them with.

A read is per study and finding. Adding one makes it the current read of its (study, finding) and marks the
one it replaces superseded; nothing is deleted, so the history stays. A batch of reads goes in one
transaction: all of them or, on any error, none.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import FINDINGS, READ_SOURCES, READ_VALUES, Analysis, Read, Series, Study, utcnow


class UnknownStudies(UserError):
    """Reads for studies the log database has never seen: nothing was added."""

    def __init__(self, uids: Sequence[str]) -> None:
        self.uids = list(uids)
        shown = ", ".join(self.uids[:5]) + (f" and {len(self.uids) - 5} more" if len(self.uids) > 5 else "")
        super().__init__(f"no such study in the log database: {shown}; reads can only be added for studies "
                         "the node received (check the StudyInstanceUID); nothing was added")


@dataclass(frozen=True)
class NewRead:
    """One read to add. value: present / absent / not_assessed; read_at: aware, when the reader read it."""

    study_instance_uid: str
    finding: str
    value: str
    reader: str | None = None
    read_at: datetime | None = None

    def check(self) -> None:
        if self.finding not in FINDINGS:
            raise ValueError(f"unknown finding {self.finding!r}; one of {', '.join(FINDINGS)}")
        if self.value not in READ_VALUES:
            raise ValueError(f"unknown read value {self.value!r}; one of {', '.join(READ_VALUES)}")
        if self.read_at is not None and self.read_at.tzinfo is None:
            raise ValueError("read_at must be an aware datetime")


@dataclass(frozen=True)
class StudyRef:
    """A study the log database knows: what the importer resolves UIDs and accession numbers to."""

    study_instance_uid: str
    accession_number: str | None


@dataclass(frozen=True)
class ResultRow:
    """One result for local performance: a study's latest analysis (the highest analysis id among all its
    series' analyses, i.e. the latest analysis of the series the node analysed last), with what it called
    and when it was delivered."""

    study_instance_uid: str
    accession_number: str | None
    series_instance_uid: str
    analysis_id: int
    revision: int
    analysed_at: datetime  # analyses.created_at
    model_name: str
    model_version: str
    probabilities: dict[str, float]
    positives: frozenset[str]
    thresholds: dict[str, float]
    first_received: datetime  # the series' first instance
    delivered: datetime | None  # all results sent; for a node without destinations, the analysis time
    state: str  # the series' state now


class ReadStore(DatabaseEngine):
    """Units of work on reads, and the reads-versus-results rows of local performance."""

    def find_studies(self, uids: Collection[str] = (), accessions: Collection[str] = ()
                     ) -> tuple[dict[str, StudyRef], dict[str, list[StudyRef]]]:
        """The known studies among `uids` (by UID) and, per accession number in `accessions`, every study
        with it (more than one: the accession number alone is ambiguous)."""
        by_uid: dict[str, StudyRef] = {}
        by_acc: dict[str, list[StudyRef]] = {}
        with self.read_session() as s:
            uid_list, acc_list = list(set(uids)), list(set(accessions))
            for start in range(0, len(uid_list), 500):
                for uid, acc in s.execute(select(Study.study_instance_uid, Study.accession_number)
                                          .where(Study.study_instance_uid.in_(uid_list[start:start + 500]))):
                    by_uid[uid] = StudyRef(uid, acc)
            for start in range(0, len(acc_list), 500):
                for uid, acc in s.execute(select(Study.study_instance_uid, Study.accession_number)
                                          .where(Study.accession_number.in_(acc_list[start:start + 500]))
                                          .order_by(Study.id)):
                    by_acc.setdefault(acc, []).append(StudyRef(uid, acc))
        return by_uid, by_acc

    def add_reads(self, reads: Sequence[NewRead], *, source: str, entered_by: str | None,
                  now: datetime | None = None) -> list[Read]:
        """Add reads in ONE transaction; each becomes current and supersedes the current read of its study
        and finding. Raises ValueError (a bad finding, value or source) or UnknownStudies, adding nothing."""
        if source not in READ_SOURCES:
            raise ValueError(f"unknown read source {source!r}; one of {', '.join(READ_SOURCES)}")
        for r in reads:
            r.check()
        now = now or utcnow()
        added: list[Read] = []
        with self.session() as s:
            wanted = sorted({r.study_instance_uid for r in reads})
            known: dict[str, str | None] = {}
            for start in range(0, len(wanted), 500):
                known.update(s.execute(select(Study.study_instance_uid, Study.accession_number)
                                       .where(Study.study_instance_uid.in_(wanted[start:start + 500]))).all())
            missing = [u for u in wanted if u not in known]
            if missing:
                raise UnknownStudies(missing)
            for r in reads:
                previous = s.scalars(select(Read).where(Read.study_instance_uid == r.study_instance_uid,
                                                        Read.finding == r.finding, Read.current.is_(True))).all()
                row = Read(study_instance_uid=r.study_instance_uid, accession_number=known[r.study_instance_uid],
                           finding=r.finding, value=r.value, reader=(r.reader or None) and r.reader[:128],
                           read_at=r.read_at, source=source, entered_by=(entered_by or None) and entered_by[:128],
                           entered_at=now, current=True)
                s.add(row)
                s.flush()
                for old in previous:
                    old.current = False
                    old.superseded_by = row.id
                s.flush()
                added.append(row)
        return added

    def current_reads(self, study_instance_uids: Collection[str] | None = None) -> dict[str, dict[str, Read]]:
        """study UID -> finding -> its current read (every study with reads, or those given)."""
        out: dict[str, dict[str, Read]] = {}
        with self.read_session() as s:
            query = select(Read).where(Read.current.is_(True)).order_by(Read.id)
            if study_instance_uids is None:
                chunks: list[Sequence[Read]] = [s.scalars(query).all()]
            else:
                uids = list(set(study_instance_uids))
                chunks = [s.scalars(query.where(Read.study_instance_uid.in_(uids[i:i + 500]))).all()
                          for i in range(0, len(uids), 500)]
            for chunk in chunks:
                for r in chunk:
                    out.setdefault(r.study_instance_uid, {})[r.finding] = r
        return out

    def read_history(self, study_instance_uid: str | None = None, limit: int | None = None) -> list[Read]:
        """Every read (of one study, or all), newest first."""
        with self.read_session() as s:
            query = select(Read).order_by(Read.id.desc())
            if study_instance_uid is not None:
                query = query.where(Read.study_instance_uid == study_instance_uid)
            if limit is not None:
                query = query.limit(limit)
            return list(s.scalars(query))

    def read_counts(self) -> dict[str, int]:
        """Current reads per value (present / absent / not_assessed)."""
        with self.read_session() as s:
            return {v: int(n) for v, n in s.execute(
                select(Read.value, func.count()).where(Read.current.is_(True)).group_by(Read.value))}

    def performance_results(self, since: datetime | None = None, until: datetime | None = None
                            ) -> list[ResultRow]:
        """Each analysed study's result (its latest analysis) made in [since, until), oldest first."""
        with self.read_session() as s:
            latest = (select(func.max(Analysis.id).label("id"))
                      .join(Series, Analysis.series_id == Series.id).group_by(Series.study_id).subquery())
            query = (select(Analysis, Series, Study)
                     .join(latest, latest.c.id == Analysis.id)
                     .join(Series, Analysis.series_id == Series.id)
                     .join(Study, Series.study_id == Study.id))
            if since is not None:
                query = query.where(Analysis.created_at >= since)
            if until is not None:
                query = query.where(Analysis.created_at < until)
            rows = s.execute(query.order_by(Analysis.created_at, Analysis.id)).all()
        out = []
        for a, x, st in rows:
            try:
                thresholds = {k: float(v) for k, v in json.loads(a.thresholds or "{}").items()}
            except (ValueError, TypeError, AttributeError):
                thresholds = {}
            delivered = x.delivered if x.state == "delivered" else a.created_at if x.state == "analyzed" else None
            out.append(ResultRow(
                study_instance_uid=st.study_instance_uid, accession_number=st.accession_number,
                series_instance_uid=x.series_instance_uid, analysis_id=a.id, revision=a.revision,
                analysed_at=a.created_at, model_name=a.model_name, model_version=a.model_version,
                probabilities={c: float(getattr(a, f"p_{c}")) for c in CLASSES},
                positives=frozenset(a.positives()), thresholds=thresholds, first_received=x.first_received,
                delivered=delivered, state=x.state))
        return out
