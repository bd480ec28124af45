"""Training data: the RSNA 2019 layout read into scans, a per-scan HU cache at the model's input size,
splits grouped by scan, and torch datasets for slices and scans.

RSNA layout: `stage_2_train.csv` with rows `ID_<sop>_<subtype>,label` and one DICOM file `ID_<sop>.dcm`
per slice in a folder. The CSV has no notion of scans, so slices are grouped by the SeriesInstanceUID in
their headers and sorted along the patient axis by ihd_node.imaging.volume (never by file name).

Cache: one uint8 `.npy` per scan holding the three windowed channels at the input size (n, 3, S, S), made
by the model's own prepare_slices (so training sees exactly what inference sees, including how the
windows clip before the resize at the skull edge), plus a `manifest.json` with the slice labels in
sorted order. Decoding DICOM is the slow part of an epoch. uint8 steps are 0.3 HU in the brain window
and 1.5 HU in the soft-tissue window, below CT noise; 3 bytes per pixel is less than float16 HU x 3.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from training.progress import progress

CACHE_VERSION = 3  # 3: thin series cached as slabs, as the node sees them
NO_MASK = 255  # mask value of slices without a lesion mask (bit 7 is never a subtype)


class DataError(UserError):
    """The training data is missing or malformed; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- labels


def read_rsna_labels(csv_path: Path) -> dict[str, np.ndarray]:
    """`ID_<sop>_<subtype>,label` rows -> {"ID_<sop>": uint8[6] in CLASSES order}.

    The key is the file stem, which is what links a row to `ID_<sop>.dcm` (in the real data the
    SOPInstanceUID itself is `ID_<hex>`). Duplicate rows (the real CSV has some) are merged by max.
    """
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: label file not found; pass --csv or put stage_2_train.csv in the "
                        "data folder")
    labels: dict[str, np.ndarray] = {}
    seen: dict[str, set[str]] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["id", "label"]:
            raise DataError(f"{csv_path}: expected the header 'ID,Label' of stage_2_train.csv, got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                stem, subtype = row[0].rsplit("_", 1)
                value = int(float(row[1]))
            except (ValueError, IndexError):
                raise DataError(f"{csv_path}:{line_no}: cannot parse {row!r}; "
                                "expected ID_<sop>_<subtype>,0|1") from None
            if subtype not in CLASSES:
                raise DataError(f"{csv_path}:{line_no}: unknown subtype {subtype!r}; "
                                f"expected one of {CLASSES}")
            arr = labels.setdefault(stem, np.zeros(len(CLASSES), dtype=np.uint8))
            k = CLASSES.index(subtype)
            arr[k] = max(arr[k], 1 if value else 0)
            seen.setdefault(stem, set()).add(subtype)
    incomplete = [s for s, subs in seen.items() if len(subs) != len(CLASSES)]
    if incomplete:
        raise DataError(f"{csv_path}: {len(incomplete)} slices lack some of the 6 label rows "
                        f"(e.g. {incomplete[0]}); the file is truncated or not the RSNA layout")
    return labels


# ---------------------------------------------------------------------------------------------- index


@dataclass
class ScanIndex:
    """One scan (series): its files; the sorted slice order is decided when it is loaded."""

    scan_id: str  # SeriesInstanceUID
    patient: str  # PatientID ("" when absent); splits group by it by default
    files: list[str]


def _pool_imap(fn: Callable, items: Sequence, workers: int, desc: str, chunksize: int = 64) -> Iterator:
    """fn over items in order, results as they come (so callers can record each one at once)."""
    if workers <= 1 or len(items) < 2:
        yield from (fn(x) for x in progress(items, desc=desc))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from progress(pool.map(fn, items, chunksize=chunksize), total=len(items), desc=desc)


def list_images(image_dir: Path) -> list[str]:
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found; pass --images (the folder of "
                        "ID_<sop>.dcm files)")
    # Absolute paths: the header index stays valid whichever way the folder is named on a later run.
    files = sorted(str(p) for p in image_dir.resolve().rglob("*.dcm"))
    if not files:
        raise DataError(f"{image_dir}: no .dcm files; pass the folder holding ID_<sop>.dcm")
    return files


def index_rsna(image_dir: Path, labels: dict[str, np.ndarray], workers: int = 1,
               header_cache: Path | None = None) -> tuple[list[ScanIndex], list[tuple[str, str]], int]:
    """Group the labelled DICOM files of the folder into scans by reading their headers.

    Headers go through the header index (header_cache, WORK/headers.jsonl): files read by an earlier run
    and unchanged since are not read again. Returns the scans, the files left out with a short reason
    (no label rows, not DICOM, not a CT slice, ...) and the number of files found.
    """
    from training.rsna import HeaderIndex, header_record

    files = list_images(image_dir)
    rejected: list[tuple[str, str]] = []
    labelled = []
    for f in files:
        if Path(f).stem in labels:
            labelled.append(f)
        else:
            rejected.append((f, "no label rows in the CSV"))
    index = HeaderIndex(header_cache) if header_cache is not None else None
    records = {}
    todo = []
    for f in labelled:
        rec = index.fresh(f) if index is not None else None
        if rec is None:
            todo.append(f)
        else:
            records[f] = rec
    if records:
        print(f"headers of {len(records)} files reused from {header_cache}", flush=True)
    batch = []
    for rec in _pool_imap(header_record, todo, workers, "reading headers", chunksize=256):
        records[rec.path] = rec
        batch.append(rec)
        if index is not None and len(batch) >= 1000:
            index.add(batch)
            batch = []
    if index is not None and batch:
        index.add(batch)
    scans: dict[str, ScanIndex] = {}
    for f in labelled:
        rec = records[f]
        if rec.problem is not None or rec.series is None:
            rejected.append((f, rec.problem or "attribute SeriesInstanceUID missing"))
            continue
        scans.setdefault(rec.series, ScanIndex(scan_id=rec.series, patient=rec.patient, files=[])).files.append(f)
    return sorted(scans.values(), key=lambda s: s.scan_id), rejected, len(files)


# ---------------------------------------------------------------------------------------------- windowing


def windowed_uint8(hu: np.ndarray, size: int, chunk: int = 16) -> np.ndarray:
    """(n, H, W) HU -> (n, 3, size, size) uint8: the model's prepare_slices before normalisation, x 255."""
    from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD
    from ihd_node.model.preprocess import prepare_slices

    mean = torch.tensor(CHANNEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CHANNEL_STD).view(1, 3, 1, 1)
    out = np.empty((hu.shape[0], 3, size, size), dtype=np.uint8)
    for start in range(0, hu.shape[0], chunk):
        x = prepare_slices(hu[start:start + chunk], size) * std + mean
        out[start:start + chunk] = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return out


# ---------------------------------------------------------------------------------------------- cache


@dataclass
class CachedScan:
    """One scan in the cache: image file, sorted SOP keys, per-slice labels (n, 6), optional lesion masks."""

    scan_id: str
    group: str
    path: str  # .npy relative to the cache folder
    keys: list[str]
    labels: list[list[int]]
    mask_path: str = ""  # (n, S/4, S/4) uint8 bitmask (bit k = SUBTYPES[k]); only synthetic data has masks
    patient: str = ""  # PatientID, for splits by patient
    dropped: list[list[str]] = field(default_factory=list)  # [path, reason] of slices left out

    @property
    def n_slices(self) -> int:
        return len(self.keys)

    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.float32).reshape(-1, len(CLASSES))


def scan_file_name(scan_id: str) -> str:
    # UIDs can be long and contain only digits and dots; a hash keeps names short and filesystem-safe.
    return hashlib.sha1(scan_id.encode()).hexdigest()[:20] + ".npy"


def mask_size(size: int) -> int:
    """Side of the cached lesion masks: a quarter of the input, finer than any CNN's last feature map."""
    return max(8, size // 4)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) lesion bitmasks -> (n, size, size): a bit is set where the lesion covers any part of a pixel."""
    m = torch.from_numpy(np.asarray(masks, dtype=np.uint8))
    if m.shape[-2:] == (size, size):
        return m.numpy().copy()
    out = torch.zeros((m.shape[0], size, size), dtype=torch.uint8)
    for k in range(8):
        bit = ((m >> k) & 1).float()
        if bit.any():
            covered = F.interpolate(bit[:, None], size=(size, size), mode="area")[:, 0] > 0
            out |= covered.to(torch.uint8) << k
    return out.numpy()


def write_cached_scan(cache_dir: Path, scan_id: str, group: str, hu: np.ndarray, keys: Sequence[str],
                      labels: np.ndarray, size: int, masks: np.ndarray | None = None) -> CachedScan:
    """Window and resize one sorted HU volume and store it as uint8; also used by the phantom recipe."""
    name = scan_file_name(scan_id)
    small = windowed_uint8(hu, size)
    tmp = cache_dir / (name + ".tmp.npy")
    np.save(tmp, small)
    os.replace(tmp, cache_dir / name)
    mask_name = ""
    if masks is not None:
        mask_name = name.removesuffix(".npy") + ".mask.npy"
        np.save(cache_dir / mask_name, resize_masks(masks, mask_size(size)))
    lab = np.asarray(labels, dtype=np.uint8).reshape(-1, len(CLASSES))
    if len(lab) != len(keys) or len(keys) != small.shape[0]:
        raise DataError(f"scan {scan_id}: {small.shape[0]} slices but {len(keys)} keys and "
                        f"{len(lab)} label rows")
    return CachedScan(scan_id=scan_id, group=group, path=name, keys=list(keys), labels=lab.tolist(),
                      mask_path=mask_name)


def _cache_one(job: tuple[ScanIndex, str, int, dict[str, list[int]]]
               ) -> tuple[CachedScan | None, list[tuple[str, str]]]:
    """Load, slab, window and store one scan; runs in worker processes. Returns the dropped files too."""
    from ihd_node.imaging.volume import VolumeError
    from training.rsna import load_training_scan

    scan, cache_dir, size, labels = job
    try:
        loaded = load_training_scan(scan.files)
    except VolumeError as exc:
        reason = str(exc)
        return None, [(f, f"scan unusable: {reason}") for f in scan.files]
    # A slab is positive for a class when any of its slices is (the node reports slabs the same way).
    lab = np.stack([np.max([labels[k] for k in members], axis=0) for members in loaded.members])
    keys = ["+".join(members) for members in loaded.members]
    cached = write_cached_scan(Path(cache_dir), scan.scan_id, scan.patient or scan.scan_id, loaded.hu, keys,
                               lab, size)
    cached.patient = scan.patient
    cached.dropped = [list(d) for d in loaded.dropped]
    return cached, loaded.dropped


PROGRESS_FILE = "done.jsonl"
PAUSE_ENV = "IHD_TRAINING_PAUSE_AFTER_SCANS"


def _read_done(cache_dir: Path, size: int) -> dict[str, CachedScan]:
    """Scans finished by earlier runs (manifest and the per-scan progress file) whose files still exist."""
    done: dict[str, CachedScan] = {}
    manifest = cache_dir / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta.get("size") == size and meta.get("version") == CACHE_VERSION:
            done = {s["scan_id"]: CachedScan(**s) for s in meta["scans"]}
    progress_path = cache_dir / PROGRESS_FILE
    if progress_path.is_file():
        with progress_path.open() as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    if entry["size"] == size and entry["version"] == CACHE_VERSION:
                        scan = CachedScan(**entry["scan"])
                        done[scan.scan_id] = scan
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
    return {k: s for k, s in done.items() if (cache_dir / s.path).is_file()}


def build_cache(scans: Sequence[ScanIndex], labels: dict[str, np.ndarray], cache_dir: Path, size: int,
                workers: int = 1) -> tuple[list[CachedScan], list[tuple[str, str]], int]:
    """Decode, sort, slab and resize every scan once; each finished scan is recorded at once
    (cache/done.jsonl), so an interrupted run resumes where it stopped.

    Returns the cached scans (in the order given), the files left out with a short reason, and how many
    scans were reused from earlier runs.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = _read_done(cache_dir, size)
    wanted = {s.scan_id for s in scans}
    reused = len(wanted & set(done))
    rejected = [(p, why) for s in scans if s.scan_id in done for p, why in done[s.scan_id].dropped]
    todo = [s for s in scans if s.scan_id not in done]
    jobs = [(s, str(cache_dir), size, {Path(f).stem: labels[Path(f).stem].tolist() for f in s.files})
            for s in todo]
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)  # test hook: stop here to be killed
    finished = 0
    with (cache_dir / PROGRESS_FILE).open("a") as log:
        for cached, dropped in _pool_imap(_cache_one, jobs, workers, f"caching scans at {size}px", chunksize=1):
            rejected.extend(dropped)
            if cached is None:
                continue
            done[cached.scan_id] = cached
            log.write(json.dumps({"size": size, "version": CACHE_VERSION, "scan": asdict(cached)}) + "\n")
            log.flush()
            finished += 1
            if pause_after and finished >= pause_after:
                print(f"paused after {finished} scans ({PAUSE_ENV})", flush=True)
                while True:
                    time.sleep(60)
    out = [done[s.scan_id] for s in scans if s.scan_id in done]
    save_manifest(cache_dir, out, size)
    (cache_dir / PROGRESS_FILE).unlink(missing_ok=True)  # everything in it is in the manifest now
    return out, rejected, reused


def save_manifest(cache_dir: Path, scans: Sequence[CachedScan], size: int) -> None:
    tmp = cache_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "size": size, "scans": [asdict(s) for s in scans]}))
    os.replace(tmp, cache_dir / "manifest.json")


def load_manifest(cache_dir: Path) -> tuple[list[CachedScan], int]:
    path = cache_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no scan cache; run `python -m training prepare` first")
    meta = json.loads(path.read_text())
    return [CachedScan(**s) for s in meta["scans"]], int(meta["size"])


# ---------------------------------------------------------------------------------------------- splits


def split_groups(scans: Sequence[CachedScan], val_fraction: float, test_fraction: float = 0.0,
                 seed: int = 0) -> dict[str, list[str]]:
    """Scan ids per split; all scans of one group land on the same side.

    Groups are shuffled with a fixed seed within two strata (any hemorrhage / none), so the splits keep
    roughly the data's share of positive scans.
    """
    groups: dict[str, list[CachedScan]] = {}
    for s in scans:
        groups.setdefault(s.group, []).append(s)
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for positive in (True, False):
        names = sorted(g for g, ss in groups.items()
                       if any(max(r[0] for r in s.labels) for s in ss) == positive)
        names = [names[i] for i in rng.permutation(len(names))]
        n_val = int(round(len(names) * val_fraction))
        n_test = int(round(len(names) * test_fraction))
        if val_fraction > 0 and n_val == 0 and len(names) >= 2:
            n_val = 1
        parts = {"val": names[:n_val], "test": names[n_val:n_val + n_test], "train": names[n_val + n_test:]}
        for split, gs in parts.items():
            out[split].extend(s.scan_id for g in gs for s in groups[g])
    return {k: sorted(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- datasets


class ScanStore:
    """The cached scans by id, with memory-mapped HU arrays (cheap random slice access)."""

    def __init__(self, cache_dir: Path, scans: Sequence[CachedScan] | None = None) -> None:
        self.cache_dir = cache_dir
        if scans is None:
            scans, self.size = load_manifest(cache_dir)
        else:
            self.size = int(np.load(cache_dir / scans[0].path, mmap_mode="r").shape[-1]) if scans else 0
        self.scans = {s.scan_id: s for s in scans}
        self._arrays: dict[str, np.ndarray] = {}
        self.max_open = 256

    def _open(self, key: str, path: Path) -> np.ndarray:
        arr = self._arrays.get(key)
        if arr is None:
            # Each memory map holds a file descriptor: keep a bounded set (RSNA has ~25k scans).
            if len(self._arrays) >= self.max_open:
                self._arrays.pop(next(iter(self._arrays)))
            arr = np.load(path, mmap_mode="r")
            self._arrays[key] = arr
        return arr

    def images(self, scan_id: str) -> np.ndarray:
        """(n, 3, S, S) uint8, memory-mapped."""
        return self._open(scan_id, self.cache_dir / self.scans[scan_id].path)

    def labels(self, scan_id: str) -> np.ndarray:
        return self.scans[scan_id].label_array()

    def masks(self, scan_id: str) -> np.ndarray | None:
        """(n, S/4, S/4) uint8 lesion bitmask, memory-mapped; None for data without masks (RSNA)."""
        scan = self.scans[scan_id]
        if not scan.mask_path:
            return None
        return self._open(scan_id + "#mask", self.cache_dir / scan.mask_path)


class SliceDataset(torch.utils.data.Dataset):
    """Single slices as (windowed uint8 (3, S, S), labels (6,) float32); with neighbours k > 0 (2.5D) the
    image is the slice and its k neighbours on each side, (3 (2k+1), S, S), stacked by the node's own
    ihd_node.model.input.stack_neighbours from the scan's sorted (and slabbed) cache.

    Augmentation runs batched on the device (training/augment.py), not here.
    """

    def __init__(self, store: ScanStore, scan_ids: Iterable[str], neighbours: int = 0) -> None:
        self.store = store
        self.neighbours = neighbours
        self.items: list[tuple[str, int]] = []
        rows = []
        for sid in scan_ids:
            lab = store.labels(sid)
            self.items.extend((sid, i) for i in range(len(lab)))
            rows.append(lab)
        self.labels = np.concatenate(rows) if rows else np.zeros((0, len(CLASSES)), np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, labels, mask); the mask is (S/4, S/4) uint8 bits, all NO_MASK where the scan has none."""
        sid, i = self.items[index]
        masks = self.store.masks(sid)
        size = mask_size(self.store.size)
        mask = (torch.from_numpy(np.array(masks[i])) if masks is not None
                else torch.full((size, size), NO_MASK, dtype=torch.uint8))
        return self.image(sid, i), torch.from_numpy(self.labels[index]), mask

    def image(self, sid: str, i: int) -> torch.Tensor:
        images = self.store.images(sid)
        k = self.neighbours
        if k == 0:
            return torch.from_numpy(np.array(images[i]))
        from ihd_node.model.input import stack_neighbours

        # Read only slices i-k .. i+k from the memory map. The window is cut at the scan's ends exactly
        # where the edge slice gets repeated, so stacking it gives what stacking the whole scan gives.
        low = max(0, i - k)
        window = torch.from_numpy(np.array(images[low:i + k + 1]))
        return stack_neighbours(window, k, i - low, i - low + 1)[0]


class ScanDataset(torch.utils.data.Dataset):
    """Whole scans as (windowed uint8 (n, 3, S, S), labels (n, 6) float32, scan id)."""

    def __init__(self, store: ScanStore, scan_ids: Iterable[str]) -> None:
        self.store = store
        self.ids = list(scan_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        sid = self.ids[index]
        images = torch.from_numpy(np.array(self.store.images(sid)))
        return images, torch.from_numpy(self.store.labels(sid)), sid


def balanced_slice_weights(labels: np.ndarray, positive_share: float = 0.5) -> np.ndarray:
    """Sampling weights giving positives `positive_share` of draws, split evenly over the subtypes present.

    A slice with several subtypes counts towards each (its weight is the sum of its subtypes' shares), so
    rare subtypes (epidural) are drawn as often as common ones. 0 keeps the natural distribution.
    """
    n = len(labels)
    if positive_share <= 0 or n == 0:
        return np.ones(n, dtype=np.float64)
    subtypes = labels[:, 1:] > 0.5
    negative = ~(labels[:, 0] > 0.5)
    present = [k for k in range(subtypes.shape[1]) if subtypes[:, k].any()]
    w = np.zeros(n, dtype=np.float64)
    if negative.any():
        w[negative] = (1.0 - positive_share) / negative.sum() if present else 1.0 / negative.sum()
    for k in present:
        w[subtypes[:, k]] += positive_share / len(present) / subtypes[:, k].sum()
    # `any` positives without a subtype label (should not happen) still get drawn sometimes.
    orphan = (labels[:, 0] > 0.5) & ~subtypes.any(axis=1)
    if orphan.any():
        w[orphan] = positive_share / max(len(present), 1) / orphan.sum()
    return w


def epoch_indices(weights: np.ndarray, n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The slice indices of one epoch, reproducible from (seed, epoch): a resumed epoch continues exactly."""
    rng = np.random.default_rng([seed, epoch])
    if np.allclose(weights, weights[0]) and n_samples == len(weights):
        return rng.permutation(len(weights))
    p = weights / weights.sum()
    return rng.choice(len(weights), size=n_samples, replace=True, p=p)
