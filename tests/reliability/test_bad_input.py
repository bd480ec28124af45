"""Bad input against the real `ihd-node serve` process: every case gets a defined DIMSE status or association
result, a log entry with the reason, and the node keeps serving; a good study sent afterwards is analysed and
delivered.

One node serves the whole module (starting one costs seconds; the cases use their own UIDs, so each test
also runs alone). The answers per class are tallied and printed at the end (`pytest -s`); they are the
figures of docs/reliability-bad-input.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from badinput import (
    CANNOT_UNDERSTAND,
    MISMATCH,
    STUDY_ROOT,
    SUCCESS,
    UNPARSEABLE,
    Sender,
    Tally,
    body_bytes,
    contexts,
    ct_slice,
    echo_ok,
    poke,
    sender,
    status_name,
)
from conftest import NODE_AET, PACS_AET, NodeProcess, wait_until
from heads import full_head
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ihd_node.intake.spool import dataset_bytes, valid_uid
from ihd_node.sim.mini_pacs import MiniPACS, send_files
from ihd_node.sim.phantom import write_series

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")

REFUSALS = {MISMATCH, CANNOT_UNDERSTAND, UNPARSEABLE}
NETWORK_TIMEOUT = 4  # node.network_timeout here: a peer stalled inside a PDU is dropped after this
MAX_WAIT = 5.0  # series.max_wait_seconds here (see env)
SLICES = 12  # >= series.min_slices (10), so a series is judged on what is wrong with it, not its length
HEAD_SLICES = 24  # the phantom studies that must go through: full heads (tests/heads.py), evidence on
SETTLED = ("ignored", "failed", "analyzed", "delivered")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
TALLY = Tally()


@dataclass
class Env:
    root: Path
    node: NodeProcess
    pacs: MiniPACS

    @property
    def port(self) -> int:
        return self.node.port

    def last_event(self) -> int:
        return int(self.node.query("SELECT coalesce(max(id), 0) FROM events")[0][0])

    def events_since(self, event_id: int) -> list[tuple[str, str, str, str | None]]:
        return self.node.query(
            "SELECT kind, level, message, series_instance_uid FROM events WHERE id > ? ORDER BY id", event_id
        )

    def refusal_logged(self, since: int, status: int) -> str:
        """The reason of the "rejected" event a refusal wrote (the node's log has the same line)."""
        hits = [
            m for kind, _, m, _ in self.events_since(since) if kind == "rejected" and f"0x{status:04X}" in m
        ]
        assert hits, f"no rejected event for 0x{status:04X}: {self.events_since(since)}"
        return hits[-1]

    def series(self, uid: str) -> tuple[str, str | None] | None:
        rows = self.node.query("SELECT state, reason FROM series WHERE series_instance_uid = ?", uid)
        return (rows[0][0], rows[0][1]) if rows else None

    def settle(self, uid: str, seconds: float = 60) -> tuple[str, str | None]:
        state = self.node.wait_state(uid, SETTLED, seconds)
        assert state in SETTLED, f"series {uid} is {state}"
        found = self.series(uid)
        assert found is not None
        return found

    def spool_files(self, sop_uid: str) -> list[Path]:
        return sorted((self.node.state_dir / "spool").glob(f"*/*/{sop_uid}_*.dcm"))

    def storescu(self, files: list[Path], *options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                NODE_AET,
                *options,
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def serving(self) -> bool:
        return (
            self.node.process is not None
            and self.node.process.poll() is None
            and echo_ok(self.port, NODE_AET)
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "node").mkdir()
    with MiniPACS(root / "pacs", ae_title=PACS_AET) as pacs:
        # The bad input here is noise images (ct_slice): the head check is not what is under test.
        # max_wait 5 s: a series the completion checks cannot judge (undecodable pixels, an aborted half)
        # is held until max_wait, and a dozen such cases at the 30 s default would take minutes.
        node = NodeProcess(root / "node", tiny_checkpoint, pacs, node={"network_timeout": NETWORK_TIMEOUT},
                           series={"require_head": False, "max_wait_seconds": MAX_WAIT})
        node.start()
        try:
            yield Env(root, node, pacs)
        finally:
            print("\nBad input tried and how the node answered (docs/reliability-bad-input.md):")
            print("\n".join(TALLY.lines()))
            node.terminate()


def uid() -> str:
    return generate_uid(prefix=f"{STUDY_ROOT}.")


# ---------------------------------------------------------------- pydicom's own test files


@dataclass
class CorpusItem:
    path: Path
    ds: Dataset | None
    sop_class: str
    sop_uid: str
    series_uid: str
    ts: str
    body: bytes  # the data set bytes of the file (after any file meta)


def corpus_item(path: Path) -> CorpusItem:
    raw = path.read_bytes()
    try:
        ds: Dataset | None = pydicom.dcmread(path, force=True)
    except Exception:  # noqa: BLE001 - some are broken on purpose; they go as raw bytes
        ds = None

    def get(keyword: str, default: str = "") -> str:
        try:
            value = ds.get(keyword) if ds is not None else None
            return str(value) if value else default
        except Exception:  # noqa: BLE001
            return default

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    if not UID(ts).is_transfer_syntax:  # no file meta: the encoding pydicom found
        implicit, little = ds.original_encoding if ds is not None else (True, True)
        ts = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    sop_class = get("SOPClassUID") or str(meta.get("MediaStorageSOPClassUID", "") or "")
    sop_uid = get("SOPInstanceUID") or str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    try:
        body = dataset_bytes(raw)
    except ValueError:  # no preamble/DICM: the whole file is the data set
        body = raw
    return CorpusItem(path, ds, sop_class, sop_uid, get("SeriesInstanceUID"), ts, body)


def send_corpus_item(env: Env, item: CorpusItem) -> tuple[str, int | None]:
    """Send as a dataset where pynetdicom can, else the file's bytes; ("how", status or None if not sent)."""
    abstract = item.sop_class if UID(item.sop_class).is_valid else SecondaryCaptureImageStorage
    offered = contexts(abstract, item.ts)
    if item.ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        offered += contexts(abstract)  # lets pynetdicom convert a dataset to an uncompressed syntax
    s = Sender(env.port, offered, called=NODE_AET, folder=env.root)
    assert s.ok, f"{item.path.name}: association refused"
    try:
        if not s.assoc.accepted_contexts:
            return "not sent: presentation context rejected by the node", None
        if item.ds is not None and item.sop_class and item.sop_uid:
            ds = item.ds
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                ds.file_meta = FileMetaDataset(getattr(ds, "file_meta", None) or FileMetaDataset())
                ds.file_meta.TransferSyntaxUID = item.ts
            try:
                return "dataset", s.store(ds)
            except (ValueError, AttributeError, TypeError, KeyError):
                pass  # pynetdicom cannot encode it: send the bytes instead
        if not s.accepted(abstract, item.ts):
            return "not sent: transfer syntax rejected by the node", None
        request_uid = item.sop_uid if 0 < len(item.sop_uid) <= 64 else uid()
        return "raw bytes", s.store_raw(item.body, sop_class=abstract, sop_uid=request_uid, ts=item.ts)
    finally:
        s.release()


def test_pydicom_corpus_one_by_one(env: Env) -> None:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) >= 50, f"only {len(files)} test files on disk in {folder}"
    stored_series: set[str] = set()
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            item = corpus_item(path)
            since = env.last_event()
            how, status = send_corpus_item(env, item)
        if status is None:
            assert how.startswith("not sent"), f"{path.name}: no answer ({how})"
            answer = why = how
        elif status == SUCCESS and item.sop_class == CTImageStorage:
            rows = env.node.query(
                "SELECT s.series_instance_uid FROM instances i JOIN series s ON i.series_id = s.id "
                "WHERE i.sop_instance_uid = ?",
                item.sop_uid,
            )
            assert rows, f"{path.name}: 0x0000 but no instance row"
            stored_series.add(rows[0][0])
            answer = why = "0x0000 stored (CT Image Storage)"
        elif status == SUCCESS:
            found = env.series(item.series_uid)
            assert found is not None and found[0] == "ignored" and found[1], f"{path.name}: {found}"
            answer = why = "0x0000 accepted, recorded as ignored (not CT Image Storage)"
        else:
            assert status in REFUSALS, f"{path.name}: status 0x{status:04X} ({how})"
            why = env.refusal_logged(since, status)
            answer = status_name(status)
        TALLY.add(f"pydicom test file ({how if how in ('dataset', 'raw bytes') else 'not sent'})", answer)
        print(f"  {path.name:45s} {how:10s} -> {why}")

    # The CT series that were stored complete and are judged like any other: each ends with a reason.
    for series_uid in sorted(stored_series):
        state, reason = env.settle(series_uid)
        assert reason, series_uid
        TALLY.add("pydicom test file: stored CT series, then", f"{state} ({reason.split(':')[0]})")
    assert env.serving()


# ---------------------------------------------------------------- truncated files


def _tag(group: int, element: int) -> bytes:
    return struct.pack("<HH", group, element)


def test_truncated_files_are_refused(env: Env) -> None:
    study, series = uid(), uid()
    points = {
        "10% of the bytes": lambda b, ds: len(b) // 10,
        "50% of the bytes": lambda b, ds: len(b) // 2,
        "90% of the bytes": lambda b, ds: len(b) * 9 // 10,
        "one byte short": lambda b, ds: len(b) - 1,
        "inside the SOP Instance UID value": lambda b, ds: b.find(str(ds.SOPInstanceUID).encode()) + 10,
        "inside an element header (Pixel Spacing)": lambda b, ds: b.find(_tag(0x0028, 0x0030)) + 3,
        "just before the pixel data element": lambda b, ds: b.find(_tag(0x7FE0, 0x0010)),
        "inside the pixel data element header": lambda b, ds: b.find(_tag(0x7FE0, 0x0010)) + 6,
    }
    cases: list[tuple[str, str, bytes, str]] = []  # (name, sop uid, bytes, transfer syntax)
    for k, (name, cut) in enumerate(points.items()):
        ds = ct_slice(series, k, study_uid=study)
        body = body_bytes(ds)
        at = cut(body, ds)
        assert 0 < at < len(body), name
        cases.append((name, ds.SOPInstanceUID, body[:at], ExplicitVRLittleEndian))
    rle = ct_slice(series, 20, study_uid=study, size=64)
    rle.compress(RLELossless)  # encapsulated pixel data: undefined length, fragments, delimiter at the end
    body = body_bytes(rle)
    cases.append(
        ("RLE: inside an encapsulated fragment", rle.SOPInstanceUID, body[: len(body) - 300], RLELossless)
    )

    with sender(
        env.port,
        contexts(CTImageStorage, ExplicitVRLittleEndian, RLELossless),
        called=NODE_AET,
        folder=env.root,
    ) as s:
        for name, sop_uid, data, ts in cases:
            since = env.last_event()
            status = s.store_raw(data, sop_class=CTImageStorage, sop_uid=sop_uid, ts=ts)
            assert status in REFUSALS, f"{name}: {status_name(status)}"
            reason = env.refusal_logged(since, status)
            assert not env.spool_files(sop_uid), name
            assert not env.node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", sop_uid), name
            TALLY.add("CT slice truncated (pynetdicom, raw bytes)", status_name(status))
            print(f"  truncated {name:45s} -> 0x{status:04X} {reason.split(': ', 1)[-1]}")

    # dcmtk's storescu reading a truncated file: what leaves the sender, if anything, is refused too.
    if shutil.which("storescu"):
        ds = ct_slice(series, 30, study_uid=study)
        whole = env.root / "whole.dcm"
        ds.save_as(whole, enforce_file_format=True)
        cut = env.root / "cut.dcm"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
        since = env.last_event()
        run = env.storescu([cut], "-nh", "-v")
        sent = [m for kind, _, m, _ in env.events_since(since) if kind == "rejected"]
        stored = env.node.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", ds.SOPInstanceUID)
        assert not stored, "a truncated file sent by storescu was stored"
        assert sent or "premature end of stream" in run.stdout + run.stderr, run.stdout + run.stderr
        answer = (
            f"refused: {sent[-1].split(':')[0]}"
            if sent
            else "not sent: storescu reads it as a bad file (premature end of stream)"
        )
        TALLY.add("CT file truncated at 75% (dcmtk storescu)", answer)
    assert env.serving()


# ---------------------------------------------------------------- not DICOM at all


def test_non_dicom_bytes_and_garbage_on_the_port(env: Env) -> None:
    rng = np.random.default_rng(4)
    bodies = {
        "a text file": b"This is not a DICOM file, it is a note.\n" * 40,
        "a PNG image": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.bytes(500),
        "random bytes": rng.bytes(4096),
        "a ZIP archive": b"PK\x03\x04" + rng.bytes(300),
    }
    with sender(env.port, contexts(CTImageStorage), called=NODE_AET, folder=env.root) as s:
        for name, data in bodies.items():
            since = env.last_event()
            sop_uid = uid()
            status = s.store_raw(data, sop_class=CTImageStorage, sop_uid=sop_uid, ts=ExplicitVRLittleEndian)
            assert status in REFUSALS, f"{name}: {status_name(status)}"
            env.refusal_logged(since, status)
            assert not env.spool_files(sop_uid)
            TALLY.add("non-DICOM file as a C-STORE data set", status_name(status))

    # Not DICOM on the DICOM port: the node answers A-ABORT where it recognises nothing, and closes the
    # connection at the latest node.network_timeout after the peer stalls inside what it took for a PDU.
    payloads = {
        "HTTP GET request": b"GET / HTTP/1.1\r\nHost: ihd-node\r\nUser-Agent: curl/8\r\n\r\n",
        "raw garbage (random bytes)": rng.bytes(2048),
        "a PDU header announcing 4 GB": b"\x04\x00\xff\xff\xff\xf0" + rng.bytes(64),
        "TLS ClientHello on a plain port": bytes.fromhex("16030100a5010000a10303") + rng.bytes(160),
    }
    logged_before = env.node.log().count("conn.closed_without_association")
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(payloads)) as pool:
        results = dict(
            zip(
                payloads,
                pool.map(lambda p: poke(env.port, p, NETWORK_TIMEOUT + 20), payloads.values()),
                strict=True,
            )
        )
    waited = time.monotonic() - t0
    for name, (closed, reply) in results.items():
        assert closed, f"{name}: the node kept the connection open"
        answer = "A-ABORT, connection closed" if reply[:1] == b"\x07" else "connection closed"
        TALLY.add("not DICOM on the DICOM port", f"{answer}")
        print(f"  {name:35s} -> {answer} (reply {reply[:10].hex()})")
    assert waited < NETWORK_TIMEOUT + 15
    assert wait_until(
        lambda: env.node.log().count("conn.closed_without_association") >= logged_before + len(payloads), 10
    ), "no log line for the dropped connections"
    assert env.serving()


# ---------------------------------------------------------------- objects the node does not analyse


def _copy_with_new_uids(src: Path, dst: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uid(), uid(), uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return str(ds.SeriesInstanceUID), str(ds.SOPClassUID)


@needs_dcmtk
def test_sop_classes_not_analysed_are_accepted_and_ignored(env: Env) -> None:
    corpus = Path(pydicom.data.__file__).parent / "test_files"
    expected: dict[str, str] = {}
    files = []
    for name in ("MR_small.dcm", "SC_rgb_small_odd.dcm", "rtdose.dcm", "reportsi.dcm", "waveform_ecg.dcm"):
        if (corpus / name).exists():
            dst = env.root / f"nonct-{name}"
            series_uid, sop_class = _copy_with_new_uids(corpus / name, dst)
            files.append(dst)
            expected[series_uid] = f"SOP class {sop_class} is not CT Image Storage or Enhanced CT Image Storage"
    assert len(files) >= 3
    run = env.storescu(files)
    assert run.returncode == 0, run.stdout + run.stderr
    for series_uid, reason in expected.items():
        assert env.series(series_uid) == ("ignored", reason)
        TALLY.add(
            "SOP class not analysed (storescu: MR, SC, RT Dose, SR, ECG)",
            "0x0000, series recorded as ignored with the reason",
        )

    # Enhanced CT and a CT Image Storage series whose Modality says MR, with pynetdicom.
    study, enhanced_series, mr_series = uid(), uid(), uid()
    enhanced = ct_slice(enhanced_series, 0, study_uid=study)
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    mislabeled = [ct_slice(mr_series, k, study_uid=study) for k in range(SLICES)]
    for ds in mislabeled:
        ds.Modality = "MR"
    assert send_files_ds(env, [enhanced]) == [SUCCESS]
    state, reason = env.settle(enhanced_series)
    assert state == "ignored" and "NumberOfFrames is missing" in reason
    TALLY.add("Enhanced CT without frames (a CT slice relabelled)", f"0x0000, series {state}: {reason}")
    assert send_files_ds(env, mislabeled) == [SUCCESS] * SLICES
    state, reason = env.settle(mr_series)
    assert (state, reason) == ("ignored", "modality MR is not CT")
    TALLY.add("CT Image Storage series with Modality MR", f"0x0000 each, series {state}: {reason}")
    assert env.serving()


def send_files_ds(env: Env, datasets: list[Dataset], *, implicit: bool = False) -> list[int | None]:
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    offered = [cx for c in classes for cx in contexts(c)]
    with sender(env.port, offered, called=NODE_AET, folder=env.root) as s:
        out = []
        for ds in datasets:
            if implicit:
                out.append(
                    s.store_raw(
                        body_bytes(ds, implicit=True),
                        sop_class=str(ds.SOPClassUID),
                        sop_uid=str(ds.SOPInstanceUID),
                        ts=ImplicitVRLittleEndian,
                    )
                )
            else:
                out.append(s.store(ds))
        return out


# ---------------------------------------------------------------- CT slices that are not images


def _rows_four_bytes(ds: Dataset) -> bytes:
    """Implicit VR with a 4-byte Rows (70000): pydicom then reads Rows as two values."""
    body = bytearray(body_bytes(ds, implicit=True))
    tag = struct.pack("<HHI", 0x0028, 0x0010, 2)
    at = body.find(tag)
    assert at >= 0
    body[at : at + 10] = struct.pack("<HHII", 0x0028, 0x0010, 4, 70000)
    return bytes(body)


def test_ct_slices_without_pixel_data_or_with_impossible_dimensions(env: Env) -> None:
    study = uid()
    # Without Pixel Data: refused per instance (0xA900), nothing stored.
    no_pixels = [ct_slice(uid(), k, study_uid=study) for k in range(3)]
    for ds in no_pixels:
        del ds.PixelData
    since = env.last_event()
    statuses = send_files_ds(env, no_pixels)
    assert statuses == [MISMATCH] * 3
    env.refusal_logged(since, MISMATCH)
    assert all(not env.spool_files(ds.SOPInstanceUID) for ds in no_pixels)
    for _ in no_pixels:
        TALLY.add("CT slice without Pixel Data", status_name(MISMATCH))

    # Impossible sizes: stored (pixel data is never decoded while receiving), then the series is ignored.
    def sized(rows: int, cols: int, n_bytes: int | None = None):  # noqa: ANN202
        def make(series_uid: str, k: int) -> Dataset:
            ds = ct_slice(series_uid, k, study_uid=study)
            ds.Rows, ds.Columns = rows, cols
            ds.PixelData = b"\0" * (rows * cols * 2 if n_bytes is None else n_bytes)
            return ds

        return make

    def rows_as_ul(series_uid: str, k: int) -> Dataset:
        ds = ct_slice(series_uid, k, study_uid=study)
        ds.add_new(0x00280010, "UL", 70000)  # explicit VR says UL: Rows reads as 70000
        return ds

    def plain(series_uid: str, k: int) -> Dataset:
        return ct_slice(series_uid, k, study_uid=study)

    cases = {
        "Rows=0 Columns=0": (sized(0, 0), False, "impossible image size 0x0"),
        "1x1": (sized(1, 1), False, "impossible image size 1x1"),
        "65535x65535 with 2 KB of pixels": (
            sized(65535, 65535, 2048),
            False,
            "impossible image size 65535x65535",
        ),
        "Rows=70000 (written as UL)": (rows_as_ul, False, "impossible image size 70000x32"),
        "Rows=70000 (4 bytes, implicit VR)": (plain, True, "malformed header value"),
    }
    for name, (make, implicit, expect) in cases.items():
        series_uid = uid()
        datasets = [make(series_uid, k) for k in range(SLICES)]
        if implicit:
            with sender(env.port, contexts(CTImageStorage), called=NODE_AET, folder=env.root) as s:
                statuses = [
                    s.store_raw(
                        _rows_four_bytes(ds),
                        sop_class=CTImageStorage,
                        sop_uid=ds.SOPInstanceUID,
                        ts=ImplicitVRLittleEndian,
                    )
                    for ds in datasets
                ]
        else:
            statuses = send_files_ds(env, datasets)
        assert statuses == [SUCCESS] * SLICES, name
        state, reason = env.settle(series_uid)
        assert state == "ignored" and reason and reason.startswith(expect), f"{name}: {state} {reason}"
        TALLY.add(
            f"CT series ({SLICES} slices) with impossible dimensions",
            f"0x0000 each, series ignored: {reason.split(' (')[0]}",
        )
    assert env.serving()


def test_series_whose_slices_disagree_are_ignored_with_the_reason(env: Env) -> None:
    study = uid()
    sizes, orientations = uid(), uid()
    mixed_size = [ct_slice(sizes, k, study_uid=study, size=32 if k % 2 else 48) for k in range(SLICES)]
    mixed_orientation = [
        ct_slice(
            orientations, k, study_uid=study, orientation=(1, 0, 0, 0, 1, 0) if k % 2 else (1, 0, 0, 0, 0, -1)
        )
        for k in range(SLICES)
    ]
    assert send_files_ds(env, mixed_size + mixed_orientation) == [SUCCESS] * (2 * SLICES)
    assert env.settle(sizes) == ("ignored", "slices differ in size: 32x32, 48x48")
    assert env.settle(orientations) == ("ignored", "slices differ in orientation; not one stack")
    TALLY.add(
        f"series ({SLICES} slices) whose slices differ in size",
        "0x0000 each, series ignored: slices differ in size",
    )
    TALLY.add(
        f"series ({SLICES} slices) whose slices differ in orientation",
        "0x0000 each, series ignored: slices differ in orientation",
    )
    assert env.serving()


# ---------------------------------------------------------------- duplicates and UIDs


def test_same_sop_instance_uid_twice_with_other_content(env: Env) -> None:
    study, series_uid = uid(), uid()
    datasets = [ct_slice(series_uid, k, study_uid=study) for k in range(SLICES)]
    again = ct_slice(series_uid, 0, study_uid=study, sop_uid=datasets[0].SOPInstanceUID, seed=9)
    assert again.PixelData != datasets[0].PixelData
    since = env.last_event()
    assert send_files_ds(env, [*datasets, again]) == [SUCCESS] * (SLICES + 1)
    warnings_ = [m for kind, level, m, s in env.events_since(since) if s == series_uid and level == "WARNING"]
    assert any("sent again with other content" in m for m in warnings_), warnings_
    digest = hashlib.sha256(body_bytes(again)).hexdigest()
    assert env.node.query(
        "SELECT sha256 FROM instances WHERE sop_instance_uid = ?", again.SOPInstanceUID
    ) == [(digest,)]
    assert len(env.spool_files(again.SOPInstanceUID)) == 2  # both kept; the newest is analysed
    assert env.settle(series_uid)[0] == "delivered"
    assert env.node.query(
        "SELECT n_slices FROM analyses a JOIN series s ON a.series_id = s.id WHERE s.series_instance_uid = ?",
        series_uid,
    ) == [(SLICES,)]
    TALLY.add(
        "same SOP Instance UID twice, other content",
        "0x0000 both, WARNING event, newest analysed, series delivered",
    )
    assert env.serving()


def test_uids_with_path_characters_never_write_outside_the_spool(env: Env) -> None:
    before = {p for p in env.root.rglob("*")}
    study, series_uid = uid(), uid()
    evil = {
        "SOPInstanceUID": ["../../../../../../tmp/ihd-evil-sop", "1.2.3\\..\\..\\evil", "1." + "2" * 70],
        "StudyInstanceUID": ["/tmp/ihd-evil-study", "..", "1.2.3 4"],
        "SeriesInstanceUID": ["1.2.3/../../../evil", ".", "1.2.3\x00/x"],
    }
    with sender(env.port, contexts(CTImageStorage), called=NODE_AET, folder=env.root) as s:
        for keyword, values in evil.items():
            for value in values:
                ds = ct_slice(series_uid, 0, study_uid=study)
                setattr(ds, keyword, value)
                request_uid = str(ds.SOPInstanceUID) if len(str(ds.SOPInstanceUID)) <= 64 else uid()
                since = env.last_event()
                status = s.store_raw(
                    body_bytes(ds), sop_class=CTImageStorage, sop_uid=request_uid, ts=ExplicitVRLittleEndian
                )
                assert status == CANNOT_UNDERSTAND, f"{keyword}={value!r}: {status_name(status)}"
                assert "is not a valid UID" in env.refusal_logged(since, status)
                TALLY.add("UID with path characters / too long", status_name(status))
        # The request's Affected SOP Instance UID with path characters, the data set's UID valid.
        ds = ct_slice(series_uid, 1, study_uid=study)
        since = env.last_event()
        status = s.store_raw(
            body_bytes(ds),
            sop_class=CTImageStorage,
            sop_uid="../../ihd-evil-request",
            ts=ExplicitVRLittleEndian,
        )
        assert status == CANNOT_UNDERSTAND
        env.refusal_logged(since, status)
        TALLY.add("UID with path characters / too long", status_name(status))
    written = {p for p in env.root.rglob("*") if p.is_file()} - before
    spool = env.node.state_dir / "spool"
    for path in spool.rglob("*.dcm"):  # every spool file is <study>/<series>/<sop>_<digest>.dcm of valid UIDs
        study_part, series_part, name = path.relative_to(spool).parts
        assert valid_uid(study_part) and valid_uid(series_part) and valid_uid(name.rsplit("_", 1)[0]), path
    assert not [p for p in written if "evil" in str(p)]
    assert not any(Path(p).exists() for p in ("/tmp/ihd-evil-sop", "/tmp/ihd-evil-study", "/tmp/evil"))
    assert not env.node.query("SELECT 1 FROM series WHERE series_instance_uid = ?", series_uid)
    assert env.serving()


# ---------------------------------------------------------------- an association aborted half-way


@needs_dcmtk
def test_association_aborted_half_way_then_resent(env: Env) -> None:
    series = full_head(11, None, n_slices=HEAD_SLICES, size=64, encoding="int16")
    files = write_series(series, env.root / "aborted")
    half = files[: SLICES // 2]
    since = env.last_event()
    run = env.storescu(half, "--abort")
    assert "Aborting Association" in run.stdout + run.stderr or run.returncode == 0, run.stdout + run.stderr
    uid_ = series.series_instance_uid
    # An abort is no release: the part waits for series.max_wait_seconds (MAX_WAIT here), not the quiet rule.
    state, reason = env.settle(uid_, 60)
    assert (state, reason) == ("ignored", f"too few slices: {SLICES // 2} < 10")
    # pynetdicom hands the A-ABORT to the association thread and closes the socket in the DUL thread:
    # whichever event the node sees first names the end ("aborted" or "closed without release").
    ended = [
        m
        for kind, _, m, _ in env.events_since(since)
        if kind == "association" and m.startswith(("aborted", "closed without release"))
    ]
    assert ended, "the abort was not logged"
    TALLY.add(
        "association aborted after half a study (storescu --abort)",
        f"partial series {state}: {reason}; resend completes it",
    )

    run = env.storescu(files)  # the sender tries again with the whole study
    assert run.returncode == 0, run.stdout + run.stderr
    assert env.node.wait_state(uid_, ("delivered",), 90) == "delivered"
    assert env.node.query("SELECT n_instances FROM series WHERE series_instance_uid = ?", uid_) == [(HEAD_SLICES,)]
    assert any(o.sop_class_uid == COMPREHENSIVE_3D_SR for o in env.pacs.objects(series.study_instance_uid))
    assert env.serving()


# ---------------------------------------------------------------- and after all of it


def test_good_study_after_all_of_this_is_analysed_and_delivered(env: Env) -> None:
    series = full_head(3, None, n_slices=HEAD_SLICES, size=64, encoding="int16")
    files = write_series(series, env.root / "good")
    assert (
        send_files(files, host="127.0.0.1", port=env.port, called_aet=NODE_AET, calling_aet="PACS")
        == [SUCCESS] * HEAD_SLICES
    )
    assert env.node.wait_state(series.series_instance_uid, ("delivered",), 90) == "delivered"
    received = env.pacs.objects(series.study_instance_uid)
    assert sum(o.sop_class_uid == COMPREHENSIVE_3D_SR for o in received) == 1
    assert any(o.sop_class_uid == SecondaryCaptureImageStorage for o in received)
    TALLY.add("good study sent after all of the above", f"delivered ({len(received)} objects at the PACS)")

    # Nothing of the above made the node fail: no "error" event, no traceback, the process still serves.
    assert env.node.query("SELECT kind, message FROM events WHERE kind = 'error' OR level = 'ERROR'") == []
    assert "Traceback" not in env.node.log()
    assert env.serving()
