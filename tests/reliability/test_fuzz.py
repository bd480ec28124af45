"""Property-based tests (hypothesis), in-process and bounded, over the three places bad input meets code:

- dataset parsing: random and mutated C-STORE data sets, sent on loopback to a real Receiver with a real
  SQLite database, are either stored (0x0000) or refused with a documented status, never anything else
  (an unexpected exception in the handler shows as 0xA700 plus an "error" event); UID/path helpers never
  let a name leave the spool;
- volume loading: small series with random geometry, encodings and missing or malformed attributes give a
  Volume or a VolumeError from load_volume, SeriesGroups from group_series, an Eligibility from
  check_series, and nothing else;
- completion: random arrivals / releases / ticks / worker steps against a real SQLite database complete
  each series exactly once per (re)opening, with the rule the README states.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from badinput import (
    CANNOT_UNDERSTAND,
    MISMATCH,
    SUCCESS,
    UNPARSEABLE,
    Sender,
    body_bytes,
    contexts,
    ct_slice,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from sqlalchemy import func, select

from ihd_node.config import SeriesConfig
from ihd_node.imaging.volume import Volume, VolumeError, group_series, load_volume
from ihd_node.intake.receiver import Admission, Receiver
from ihd_node.intake.recorder import DatabaseRecorder
from ihd_node.intake.spool import Spool, dataset_bytes, valid_uid
from ihd_node.store import Database, Event, Instance, open_database, utcnow
from ihd_node.triage.assembler import Assembler
from ihd_node.triage.select import Eligibility, check_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every odd value we make

NODE_AET = "IHD_AI"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
REFUSALS = {MISMATCH, CANNOT_UNDERSTAND, UNPARSEABLE}  # 0xA700 would mean an unexpected exception


# ---------------------------------------------------------------- dataset parsing (receiver on loopback)


@dataclass
class Scp:
    root: Path
    db: Database
    spool: Spool
    receiver: Receiver
    sender: Sender

    def count(self, model: type, *where: object) -> int:
        with self.db.read_session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


@pytest.fixture(scope="module")
def scp() -> Iterator[Scp]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db = open_database(f"sqlite:///{root / 'ihd.sqlite'}")
        spool = Spool(root / "spool")
        receiver = Receiver(
            spool,
            DatabaseRecorder(db),
            Admission(ae_title=NODE_AET),
            host="127.0.0.1",
            port=0,
            network_timeout=10,
        ).start()
        syntaxes = (
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian,
        )
        sender = Sender(
            receiver.port,
            contexts(CTImageStorage, *syntaxes) + contexts(MRImageStorage, *syntaxes),
            called=NODE_AET,
            folder=root,
        )
        assert sender.ok
        yield Scp(root, db, spool, receiver, sender)
        sender.release()
        receiver.stop()
        db.close()


def _reconnect(scp: Scp) -> None:
    if not scp.sender.ok:  # a refused store never ends the association; keep the fuzz going if one did
        scp.sender = Sender(
            scp.receiver.port,
            [(cx.abstract_syntax, cx.transfer_syntax) for cx in scp.sender.assoc.requested_contexts],
            called=NODE_AET,
            folder=scp.root,
        )


VALID_BODIES = {
    ts: body_bytes(
        ct_slice(
            "1.2.826.0.1.3680043.8.498.7",
            0,
            study_uid="1.2.826.0.1.3680043.8.498.8",
            sop_uid="1.2.826.0.1.3680043.8.498.9",
            size=8,
        ),
        implicit=ts == ImplicitVRLittleEndian,
    )
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
}


@st.composite
def mutated_body(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid small CT data set, then a few mutations: cut, flip, insert, overwrite a length, splice."""
    ts = draw(st.sampled_from(sorted(VALID_BODIES)))
    data = bytearray(VALID_BODIES[ts])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "insert", "length", "splice", "uid", "pixel", "pixel"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "cut":
            del data[pos:]
        elif kind == "pixel" and len(data) > 128:  # other pixel values: still a valid data set
            data[len(data) - 1 - pos % 128] ^= draw(st.integers(1, 255))
        elif kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "length" and len(data) >= pos + 4:
            data[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 2**31])))
        elif kind == "splice" and data:
            end = draw(st.integers(pos, len(data)))
            data[pos:pos] = data[pos:end]
        elif kind == "uid":  # a path-like UID of the same length where the SOP Instance UID was
            at = data.find(b"1.2.826.0.1.3680043.8.498.9")
            if at >= 0:
                data[at : at + 27] = draw(
                    st.sampled_from(
                        [
                            b"../../../../../../../../../x",
                            b"/etc/passwd/../../../../..",
                            b"1.2.826.0.1.3680043.8.498/9",
                        ]
                    )
                )[:27].ljust(27, b".")
    return ts, bytes(data)


body_strategy = st.one_of(
    mutated_body(),
    st.tuples(
        st.sampled_from(
            [
                ExplicitVRLittleEndian,
                ImplicitVRLittleEndian,
                ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian,
            ]
        ),
        st.binary(max_size=600),
    ),
)


@FUZZ
@given(
    body=body_strategy,
    sop_class=st.sampled_from([CTImageStorage, MRImageStorage]),
    request_uid=st.sampled_from(["1.2.826.0.1.3680043.8.498.9"] * 3 + ["fresh", "../x", "1.2.3.4/5"]),
)
def test_random_and_mutated_datasets_are_stored_or_refused_with_a_documented_status(
    scp: Scp, body: tuple[str, bytes], sop_class: str, request_uid: str
) -> None:
    ts, data = body
    sop_uid = generate_uid() if request_uid == "fresh" else request_uid
    spool_before = set(scp.root.rglob("*"))
    errors_before = scp.count(Event, Event.kind == "error")
    _reconnect(scp)

    status = scp.sender.store_raw(data, sop_class=sop_class, sop_uid=sop_uid, ts=ts)

    assert status == SUCCESS or status in REFUSALS, f"status {status} for {len(data)} bytes"
    event(f"0x{status:04X}")
    assert scp.count(Event, Event.kind == "error") == errors_before, "the handler raised unexpectedly"
    new_files = {p for p in set(scp.root.rglob("*")) - spool_before if p.is_file() and p.suffix == ".dcm"}
    for path in new_files:  # whatever was written lies inside the spool under a parseable name
        assert scp.spool.parse(path) is not None, path
    if status != SUCCESS:
        assert not new_files
        assert scp.count(Event, Event.kind == "rejected", Event.message.contains(f"0x{status:04X}")) > 0
    elif sop_class == CTImageStorage:  # stored: the row names the bytes received
        digest = hashlib.sha256(data).hexdigest()
        assert scp.count(Instance, Instance.sop_instance_uid == sop_uid, Instance.sha256 == digest) == 1
        assert len(new_files) <= 1  # zero when the identical bytes were spooled before
    else:
        assert not new_files  # other classes are answered 0x0000 and recorded as ignored, no files


@FUZZ
@given(
    uids=st.lists(
        st.one_of(
            st.text(max_size=70),
            st.from_regex(r"[0-9.]{1,70}", fullmatch=True),
            st.sampled_from(["..", ".", "/", "1.2/../3", "1.2\\3", "1.2\x003", "1" * 65]),
        ),
        min_size=3,
        max_size=3,
    ),
    digest=st.one_of(
        st.text(alphabet="0123456789abcdef./", min_size=64, max_size=64),
        st.just(hashlib.sha256(b"x").hexdigest()),
    ),
)
def test_spool_names_never_leave_the_spool(
    tmp_path_factory: pytest.TempPathFactory, uids: list[str], digest: str
) -> None:
    spool = Spool(tmp_path_factory.getbasetemp() / "spool-names")
    try:
        path = spool.path_for(uids[0], uids[1], uids[2], digest)
    except ValueError:
        assert not all(valid_uid(u) for u in uids) or not all(c in "0123456789abcdef" for c in digest)
        return
    assert all(valid_uid(u) for u in uids)
    assert spool.root.resolve() in path.resolve().parents
    name = spool.parse(path)
    assert name is not None and (name.study_uid, name.series_uid, name.sop_uid) == tuple(uids)


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=400), st.binary(max_size=200).map(lambda b: b"\0" * 128 + b"DICM" + b))
)
def test_dataset_bytes_of_random_files_returns_bytes_or_refuses(data: bytes) -> None:
    try:
        out = dataset_bytes(data)
    except ValueError:
        assert data[128:132] != b"DICM" or len(data) < 132
        return
    assert isinstance(out, bytes) and len(out) <= len(data) - 132


# ---------------------------------------------------------------- volume loading


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIENTATIONS = [
    AXIAL,
    (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    (1.0, 0.0, 0.0, 1.0, 0.0, 0.0),  # coronal, degenerate
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0, 0.0, 0.966, 0.259),
]  # zero, tilted 15 deg
DROPPABLE = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "PixelData",
    "Modality",
    "SOPClassUID",
    "SeriesInstanceUID",
    "RescaleSlope",
    "RescaleIntercept",
    "BitsStored",
    "InstanceNumber",
    "SliceThickness",
    "StudyInstanceUID",
    "SOPInstanceUID",
]
MALFORMED = {  # raw values a damaged or odd sender might write
    "ImageOrientationPatient": (
        0x00200037,
        "DS",
        [b"1\\0\\x\\y", b"1\\0\\0\\0\\1", b"", b"nan\\0\\0\\0\\1\\0"],
    ),
    "ImagePositionPatient": (0x00200032, "DS", [b"0\\0", b"a\\b\\c ", b"inf\\0\\0 ", b""]),
    "PixelSpacing": (0x00280030, "DS", [b"0.5", b"x\\y ", b"0\\0 ", b""]),
    "RescaleSlope": (0x00281053, "DS", [b"abc ", b"nan ", b"0 ", b""]),
    "RescaleIntercept": (0x00281052, "DS", [b"-1024\\1 ", b"x ", b""]),
    "InstanceNumber": (0x00200013, "IS", [b"1.5 ", b"x ", b"99999999999 "]),
    "Rows": (0x00280010, "US", [b"\x10\x00\x10\x00", b"\x00\x00", b"\xff\xff"]),
    "BitsStored": (0x00280101, "US", [b"\x0c\x00", b"\x40\x00", b"\x00\x00"]),
    "SliceThickness": (0x00180050, "DS", [b"-5 ", b"x ", b"1e400 "]),
}


@dataclass
class SliceSpec:
    size: tuple[int, int]
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    drop: frozenset[str]
    malformed: dict[str, bytes]
    pixels: str  # exact, short, long, empty
    sop_class: str
    modality: str
    localizer: bool


@st.composite
def series_spec(draw: st.DrawFn) -> tuple[str, list[SliceSpec]]:
    encoding = draw(st.sampled_from(["explicit", "implicit", "big", "deflated", "rle"]))
    n = draw(st.integers(1, 4))
    base = draw(st.sampled_from([(16, 16), (16, 20), (1, 1), (0, 0), (24, 16), (5000, 16)]))
    odd = draw(st.integers(0, 3))  # how unusual the slices are: 0 = a clean series
    step = draw(st.sampled_from([5.0, 2.5, 0.0, -5.0]))
    slices = []
    for k in range(n):

        def maybe(strategy: st.SearchStrategy, default: object) -> object:
            return draw(strategy) if odd and draw(st.integers(0, 3)) < odd else default

        slices.append(
            SliceSpec(
                size=maybe(st.sampled_from([(16, 16), (20, 16), (1, 1)]), base),  # type: ignore[arg-type]
                orientation=maybe(st.sampled_from(ORIENTATIONS), AXIAL),  # type: ignore[arg-type]
                position=maybe(
                    st.tuples(*[st.floats(-1e3, 1e3, allow_nan=False)] * 3),  # type: ignore[arg-type]
                    (0.0, 0.0, step * k),
                ),
                drop=maybe(st.frozensets(st.sampled_from(DROPPABLE), max_size=2), frozenset()),  # type: ignore
                malformed=maybe(
                    st.dictionaries(st.sampled_from(sorted(MALFORMED)), st.integers(0, 3), max_size=2), {}
                ),  # type: ignore[arg-type]
                pixels=maybe(st.sampled_from(["exact", "short", "long", "empty"]), "exact"),  # type: ignore
                sop_class=maybe(st.sampled_from([CTImageStorage, MRImageStorage]), CTImageStorage),  # type: ignore
                modality=maybe(st.sampled_from(["CT", "MR", ""]), "CT"),  # type: ignore[arg-type]
                localizer=bool(maybe(st.booleans(), False)),
            )
        )
    return encoding, slices


def write_slice(folder: Path, spec: SliceSpec, k: int, encoding: str, series_uid: str) -> Path:
    rows, cols = spec.size
    ds = ct_slice(series_uid, k, study_uid="1.2.826.0.1.3680043.8.498.77", size=16)
    ds.Rows, ds.Columns = rows, cols
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = spec.sop_class
    ds.Modality = spec.modality
    ds.ImageOrientationPatient = list(spec.orientation)
    ds.ImagePositionPatient = list(spec.position)
    if spec.localizer:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    pixels = np.random.default_rng(k).integers(-1000, 1000, (max(rows, 0), max(cols, 0))).astype(np.int16)
    data = pixels.astype(">i2" if encoding == "big" else "<i2").tobytes()
    ds.PixelData = {"exact": data, "short": data[: len(data) // 2], "long": data + b"\0\0\0\0", "empty": b""}[
        spec.pixels
    ]
    for keyword, choice in spec.malformed.items():
        tag, vr, values = MALFORMED[keyword]
        value = values[choice % len(values)]
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    for keyword in spec.drop:
        if keyword in ds:
            del ds[keyword]
    ts = {
        "explicit": ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "big": ExplicitVRBigEndian,
        "deflated": DeflatedExplicitVRLittleEndian,
        "rle": ExplicitVRLittleEndian,
    }[encoding]
    ds.file_meta.TransferSyntaxUID = ts
    if encoding == "rle":
        try:
            ds.compress(RLELossless)
        except Exception:  # noqa: BLE001 - not compressible as drawn: keep it uncompressed
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{k}.dcm"
    ds.preamble = b"\0" * 128  # file meta as drawn (it may disagree with the data set), nothing repaired
    ds.save_as(path, enforce_file_format=False)
    return path


@FUZZ
@given(spec=series_spec())
def test_volume_loading_gives_a_volume_or_a_volume_error(spec: tuple[str, list[SliceSpec]]) -> None:
    encoding, slices = spec
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        series_uid = generate_uid()
        try:
            paths = [write_slice(Path(tmp), s, k, encoding, series_uid) for k, s in enumerate(slices)]
        except Exception:  # noqa: BLE001 - pydicom cannot write this combination; nothing to load
            event("not writable")
            return

        groups = group_series(paths)
        assert sum(len(v) for v in groups.series.values()) + len(groups.rejected) == len(paths)
        assert all(isinstance(reason, str) and reason for _, reason in groups.rejected)

        try:  # as the node's judge reads them; an unreadable file fails the series there, with the reason
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        except Exception:  # noqa: BLE001
            headers = []
        verdict = check_series(headers, SeriesConfig(min_slices=1))
        assert isinstance(verdict, Eligibility) and verdict.reason
        event(f"check_series ok={verdict.ok}")

        try:
            volume = load_volume(paths)
        except VolumeError as exc:
            assert str(exc)
            event("VolumeError")
            return
        event("Volume")
        assert isinstance(volume, Volume)
        n, rows, cols = volume.hu.shape
        assert volume.hu.dtype == np.float32 and 1 <= n <= len(paths)
        assert np.isfinite(volume.hu).all()  # no NaN/inf HU reaches the model
        assert len(volume.slices) == len(volume.headers) == n
        assert 16 <= rows <= 4096 and 16 <= cols <= 4096
        positions = [s.position for s in volume.slices]
        assert all(b - a >= 1e-3 for a, b in zip(positions, positions[1:], strict=False))  # sorted, no dups
        assert volume.series_instance_uid == series_uid


# ---------------------------------------------------------------- completion (assembler)


QUIET, MAX_WAIT = 1000, 5000  # milliseconds: whole numbers, so the model's clock has no rounding of its own

operation = st.one_of(
    st.tuples(
        st.just("arrive"), st.integers(0, 2), st.integers(0, 1), st.sampled_from(["new", "same", "changed"])
    ),
    st.tuples(st.just("release"), st.integers(0, 1)),
    st.tuples(st.just("wait"), st.sampled_from([0, 300, QUIET, MAX_WAIT // 2, MAX_WAIT, MAX_WAIT + 100])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("worker"), st.integers(0, 2), st.sampled_from(["analyzed", "ignored", "failed"])),
)


@dataclass
class Model:
    """What the README says should happen to one series."""

    state: str = "received"
    last: int = 0
    association: str = ""
    released: bool = False
    openings: int = 1
    completions: int = 0


@FUZZ
@given(ops=st.lists(operation, min_size=1, max_size=25))
def test_each_series_completes_exactly_once_per_opening_with_the_right_rule(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(f"sqlite:///{Path(tmp) / 'ihd.sqlite'}")
        try:
            _run_completion(db, ops)
        finally:
            db.close()


def _run_completion(db: Database, ops: list[tuple]) -> None:
    t0 = utcnow()
    now = 0  # ms since t0
    series_uids = [generate_uid() for _ in range(3)]
    generation = [0, 0]  # an association id is never reused once released
    sops: dict[int, list[str]] = {i: [] for i in range(3)}
    models: dict[int, Model] = {}
    handed: list[str] = []
    rules = SeriesConfig(quiet_seconds=QUIET / 1000, max_wait_seconds=MAX_WAIT / 1000)
    assembler = Assembler(db, rules, handed.append)

    def at(ms: int):  # noqa: ANN202
        return t0 + timedelta(milliseconds=ms)

    def tick() -> None:
        expected = {}
        for i, m in models.items():
            if m.state != "received":
                continue
            quiet = m.released and now - m.last >= QUIET
            if quiet or now - m.last >= MAX_WAIT:
                expected[series_uids[i]] = "quiet" if quiet else "max_wait"
        before = len(handed)
        done = {c.series_instance_uid: c.rule for c in assembler.tick(now=at(now))}
        assert done == expected, f"at t={now} ms: completed {done}, expected {expected}"
        assert handed[before:] == list(done)  # handed over once each, in completion order
        for i, m in models.items():
            if series_uids[i] in done:
                m.state, m.completions = "complete", m.completions + 1
                row = db.get_series(series_uids[i])
                assert (
                    row is not None
                    and row.state == "complete"
                    and row.completion_rule == done[series_uids[i]]
                )

    for op in ops:
        if op[0] == "arrive":
            _, i, a, how = op
            association = f"assoc-{a}-{generation[a]}"
            if how == "new" or not sops[i]:
                sops[i].append(generate_uid())
                content = sops[i][-1]
            else:
                content = sops[i][-1] + ("-changed" if how == "changed" else "")
            sha = hashlib.sha256(
                f"{content}-{now}".encode() if how == "changed" else content.encode()
            ).hexdigest()
            rec = db.record_instance(
                study_instance_uid="1.2.826.0.1.3680043.8.498.5",
                series_instance_uid=series_uids[i],
                sop_instance_uid=sops[i][-1],
                sop_class_uid=CTImageStorage,
                path=f"/spool/{content}.dcm",
                size=1,
                sha256=sha,
                association_id=association,
                received_at=at(now),
            )
            m = models.get(i)
            if m is None:
                models[i] = Model(last=now, association=association)
                assert rec.new and rec.previous_state is None
            elif rec.new or rec.changed_content:
                assert rec.reopened == (m.state != "received")
                if m.state != "received":
                    m.state, m.openings = "received", m.openings + 1
                m.last, m.association, m.released = now, association, False
            else:  # identical resend: nothing about completion changes
                assert not rec.reopened
        elif op[0] == "release":
            association = f"assoc-{op[1]}-{generation[op[1]]}"
            db.association_released(association, when=at(now))
            generation[op[1]] += 1
            for m in models.values():
                if m.association == association:
                    m.released = True
        elif op[0] == "wait":
            now += op[1]
        elif op[0] == "tick":
            tick()
        elif op[0] == "worker":  # the inference worker finishing (or the judge ignoring) a complete series
            _, i, final = op
            m = models.get(i)
            moved = db.set_series_state(
                series_uids[i], "analyzing", expect="complete"
            ) and db.set_series_state(series_uids[i], final, "fuzz", expect="analyzing")
            assert moved == (m is not None and m.state == "complete")
            if moved:
                m.state = final  # type: ignore[union-attr]

    now += MAX_WAIT + 1  # whatever is still open completes now, by one rule or the other, and only once
    tick()
    tick()
    for i, m in models.items():
        assert m.state != "received"
        assert m.completions == m.openings, f"series {i}: {m.completions} completions, {m.openings} openings"
        assert handed.count(series_uids[i]) == m.openings
