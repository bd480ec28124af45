"""The spool: received instances as files, written so that a crash never leaves a half file behind.

Layout: <storage>/spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>_<digest>.dcm, where digest is the
first 16 hex digits of the SHA-256 of the dataset bytes as received (the database keeps all 64). The
digest in the name makes a resend of identical bytes land on the same file (idempotent) and a resend
with other content a second file (both kept; the database points at the newest, which is analysed).
UIDs are validated before they become path parts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from ihd_node import faults

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_PREFIX = ".tmp-"


def valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters; anything else never becomes a path."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


def sha256_hex(data: bytes) -> str:
    """Digest of the dataset bytes as received (file meta excluded: it names the sender's TS only)."""
    return hashlib.sha256(data).hexdigest()


def dataset_bytes(raw: bytes) -> bytes:
    """The dataset part of a DICOM file (after preamble and the explicit-VR-LE group 0002)."""
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise ValueError("not a DICOM file (no DICM marker)")
    pos = 132
    while pos + 8 <= len(raw) and int.from_bytes(raw[pos:pos + 2], "little") == 0x0002:
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            length = int.from_bytes(raw[pos + 8:pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(raw[pos + 6:pos + 8], "little")
            pos += 8 + length
    return raw[pos:]


# The File Meta Information pynetdicom writes for a received instance (pynetdicom.dsutils.create_file_meta):
# its own implementation identity, kept so that the node's spool files stay byte for byte what they were.
_META_IMPLEMENTATION_UID = str(PYNETDICOM_IMPLEMENTATION_UID)
_META_IMPLEMENTATION_VERSION = str(PYNETDICOM_IMPLEMENTATION_VERSION)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_preamble(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, DICM and File Meta Information of a received data set, as pynetdicom's
    Event.encoded_dataset() writes them (tests/test_receiver.py compares), without building pydicom data
    sets per instance (that was ~10 % of the receiving threads' time)."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(_META_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _padded(_META_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group fsync of a folder: writers that renamed into the same folder while one fsync of it ran share
    the next one, instead of each waiting for its own (concurrent associations of one series all write to
    one folder). A caller returns only after an fsync that *started* after its call has finished, so its
    rename (done before the call) is covered."""

    def __init__(self, sync: Callable[[Path], None] = fsync_dir) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._asked: dict[Path, int] = {}  # per folder: tickets handed out
        self._done: dict[Path, int] = {}  # per folder: every ticket up to this one is covered
        self._inside: dict[Path, int] = {}  # per folder: callers not yet returned
        self._running: set[Path] = set()
        self.syncs = 0  # fsyncs done (tests)

    def __call__(self, folder: Path) -> None:
        with self._cond:
            ticket = self._asked[folder] = self._asked.get(folder, 0) + 1
            self._inside[folder] = self._inside.get(folder, 0) + 1
        try:
            self._wait_or_sync(folder, ticket)
        finally:
            with self._cond:
                self._inside[folder] -= 1
                if not self._inside[folder]:  # no ticket of this folder is outstanding: forget it
                    del self._inside[folder], self._asked[folder]
                    self._done.pop(folder, None)

    def _wait_or_sync(self, folder: Path, ticket: int) -> None:
        with self._cond:
            while self._done.get(folder, 0) < ticket and folder in self._running:
                self._cond.wait()
            if self._done.get(folder, 0) >= ticket:
                return  # an fsync that started after this call covered it
            self._running.add(folder)  # none running: this caller syncs, for itself and whoever came since
            covers = self._asked[folder]  # every ticket handed out before this fsync starts
        ok = False
        try:
            self._sync(folder)
            ok = True
        finally:
            with self._cond:
                self._running.discard(folder)
                self.syncs += 1
                if ok:
                    self._done[folder] = max(self._done.get(folder, 0), covers)
                self._cond.notify_all()  # failed: the next waiter tries its own fsync


_dir_sync = DirSync()


def make_dirs_durable(folder: Path, mode: int = 0o700) -> None:
    """mkdir -p whose new folders survive a crash: the entry of each new folder is fsynced in its parent
    (a new study or series folder otherwise may vanish with the files renamed into it, answered success)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=mode)
        except FileExistsError:
            pass  # a concurrent writer made it; its entry may not be durable yet, so sync the parent anyway
        _dir_sync(new.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, fault: str | None = "receive.spooled") -> None:
    """Temp file in the same folder + fsync + rename: readers see the whole file or none.

    `fault` names the crash point of ihd_node.faults passed once the file is in place (tests only)."""
    if not path.parent.is_dir():
        make_dirs_durable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _dir_sync(path.parent)  # shared with concurrent writers into the same folder (DirSync)
    if fault:
        faults.point(fault)


def write_dataset_atomic(path: Path, ds: Dataset) -> None:
    """Save a dataset in the DICOM file format atomically (results, before they go to the outbox)."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    write_atomic(path, buf.getvalue(), mode=0o600, fault=None)


@dataclass(frozen=True)
class SpoolName:
    study_uid: str
    series_uid: str
    sop_uid: str
    digest: str


class Spool:
    """Owner-only folder tree of received instances."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"invalid sha256 {sha256!r}")
        path = self.root / study_uid / series_uid / f"{sop_uid}_{sha256[:16]}.dcm"
        # Belt and braces: the validated parts cannot leave the root, but check the resolved path anyway.
        if self.root.resolve() not in path.resolve().parents:
            raise ValueError(f"path {path} escapes the spool")
        return path

    def parse(self, path: Path) -> SpoolName | None:
        """The UIDs and digest encoded in a spool path, or None when it is not one of ours."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if len(parts) != 3 or not parts[2].endswith(".dcm") or "_" not in parts[2]:
            return None
        sop, dig = parts[2][:-4].rsplit("_", 1)
        uids_ok = valid_uid(parts[0]) and valid_uid(parts[1]) and valid_uid(sop)
        if not (uids_ok and re.fullmatch(r"[0-9a-f]{16}", dig)):
            return None
        return SpoolName(parts[0], parts[1], sop, dig)

    def files(self) -> Iterator[Path]:
        """Every complete spool file (temp files excluded)."""
        for path in sorted(self.root.glob("*/*/*.dcm")):
            if not path.name.startswith(TMP_PREFIX):
                yield path

    def remove_temp_files(self) -> int:
        """Half-written files left by a crash; their senders got no success and will resend."""
        count = 0
        for path in self.root.glob(f"*/*/{TMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            count += 1
        return count

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        if valid_uid(study_uid) and valid_uid(series_uid):
            shutil.rmtree(self.root / study_uid / series_uid, ignore_errors=True)
            try:
                (self.root / study_uid).rmdir()  # only when empty
            except OSError:
                pass

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
