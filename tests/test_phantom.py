"""Synthetic head CTs: physics (HU per tissue), lesion shapes, labels, determinism, DICOM validity."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.commands.cli import main as cli_main
from ihd_node.errors import UserError
from ihd_node.imaging.volume import load_volume
from ihd_node.sim import phantom
from ihd_node.sim.phantom.render import min_pixels

T = phantom.TISSUE
# Noise-free, unblurred, one plane per slice: every pixel holds exactly the value of its tissue.
CLEAN = {"noise_sigma": 0.0, "blur_mm": 0.0, "partial_volume": False, "mass_effect": False}


def bit(subtype: str) -> int:
    return 1 << SUBTYPES.index(subtype)


def mask_of(series: phantom.PhantomSeries, subtype: str) -> np.ndarray:
    return (series.masks & bit(subtype)) != 0


def test_tissue_hu_ranges() -> None:
    s = phantom.make_series(4, subtypes=[], n_slices=10, size=160, **CLEAN)
    expected = {"air": (-1010, -990), "scalp": (20, 60), "bone": (700, 1800), "grey": (34, 46),
                "white": (25, 32), "csf": (0, 15), "ventricle": (0, 15)}
    for name, (lo, hi) in expected.items():
        values = s.hu[s.tissue == T[name]]
        assert values.size > 50, name
        assert lo <= np.median(values) <= hi, (name, np.median(values))
    bone = s.hu[s.tissue == T["bone"]]
    assert np.percentile(bone, 2) >= 690 and bone.max() <= 1800
    brain = s.hu[np.isin(s.tissue, [T["grey"], T["white"]])]
    assert np.percentile(brain, 1) >= 22 and np.percentile(brain, 99) <= 47
    assert not (s.tissue == T["blood"]).any() and not s.labels.any() and not s.masks.any()


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_lesion_hu_and_labels(subtype: str) -> None:
    s = phantom.make_series(20 + SUBTYPES.index(subtype), subtypes=[subtype], n_slices=12, size=160, **CLEAN)
    assert s.subtypes == (subtype,)
    m = mask_of(s, subtype)
    assert m.any()
    assert s.hu[m].min() >= 50 and s.hu[m].max() <= 90
    assert np.all(s.tissue[m] == T["blood"])
    column = CLASSES.index(subtype)
    assert s.labels[:, column].any() and s.labels[:, 0].any()
    others = [c for c in range(1, 6) if c != column]
    assert not s.labels[:, others].any()


def test_labels_agree_with_masks_and_noise_is_there() -> None:
    for seed in range(6):
        s = phantom.make_series(seed, subtypes=["any"], n_slices=10, size=128)
        per_subtype = np.stack([((s.masks >> k) & 1).reshape(s.n_slices, -1).sum(1) for k in range(5)], 1)
        min_px = min_pixels(s.pixel_spacing)
        assert np.array_equal(s.labels[:, 1:], (per_subtype > 0).astype(np.uint8))
        assert per_subtype[per_subtype > 0].min() >= min_px
        assert np.array_equal(s.labels[:, 0], s.labels[:, 1:].max(1))
        assert s.labels[:, 0].any() and s.subtypes
        assert s.labels.dtype == np.uint8 and s.masks.dtype == np.uint8 and s.hu.dtype == np.float32
        air = s.hu[binary_erosion(s.tissue == T["air"], iterations=4)]  # away from blurred edges
        assert 2.0 < air.std() < 13.0  # 3-12 HU of noise


def test_deterministic_per_seed_and_varied_between_seeds() -> None:
    a = phantom.make_series(9, subtypes=["subdural"], n_slices=5, size=96)
    b = phantom.make_series(9, subtypes=["subdural"], n_slices=5, size=96)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.masks, b.masks)
    assert a.sop_uids_sorted == b.sop_uids_sorted and a.series_instance_uid == b.series_instance_uid
    assert [d.SOPInstanceUID for d in a.datasets] == [d.SOPInstanceUID for d in b.datasets]
    c = phantom.make_series(10, n_slices=5, size=96)
    assert c.study_instance_uid != a.study_instance_uid and not np.array_equal(c.hu, a.hu)
    for uid in (a.study_instance_uid, a.series_instance_uid, *a.sop_uids_sorted):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    # Subtypes do not change the head or the acquisition, only the blood (and the UIDs: other content). Other
    # blood is another study: its own Study UID and accession number (a PACS would merge one study's series).
    neg = phantom.make_series(9, subtypes=[], n_slices=5, size=96)
    ivh = phantom.make_series(9, subtypes=["intraventricular"], n_slices=5, size=96)
    assert neg.pixel_spacing == a.pixel_spacing and neg.slice_spacing == a.slice_spacing
    assert len({s.study_instance_uid for s in (a, neg, ivh)}) == 3
    assert len({s.series_instance_uid for s in (a, neg, ivh)}) == 3
    assert len({str(s.datasets[0].AccessionNumber) for s in (a, neg, ivh)}) == 3
    assert len({str(s.datasets[0].StudyID) for s in (a, neg, ivh)}) == 3
    assert a.datasets[0].PatientID == neg.datasets[0].PatientID  # the same (synthetic) patient
    assert neg.encoding == a.encoding and np.array_equal(neg.tissue == T["bone"], a.tissue == T["bone"])


def test_variation_defaults() -> None:
    sizes, spacings, tilts, counts, negatives = set(), [], [], [], 0
    for seed in range(12):
        s = phantom.make_series(seed, size=64, n_slices=None if seed < 3 else 3)
        spacings.append(s.slice_spacing)
        tilts.append(s.tilt_deg)
        counts.append(s.n_slices)
        negatives += not s.labels.any()
        sizes.add(s.hu.shape[1:])
    assert sizes == {(64, 64)}
    assert all(4.0 <= v <= 6.0 for v in spacings) and any(t != 0 for t in tilts)
    assert all(24 <= c <= 36 for c in counts[:3])
    assert 2 <= negatives <= 10
    thin = phantom.make_series(1, n_slices=6, size=64, thin=True)
    assert 1.0 <= thin.slice_spacing <= 2.5
    with pytest.raises(TypeError):
        phantom.make_series(1, n_slices=2, size=64, colour="blue")
    with pytest.raises(UserError, match="valid: epidural"):
        phantom.make_series(1, subtypes=["bleed"], n_slices=2, size=64)


@pytest.mark.parametrize("encoding", list(phantom.ENCODINGS))
def test_files_load_back_sorted_with_tilt_and_shuffle(tmp_path: Path, encoding: str) -> None:
    s = phantom.make_series(31, subtypes=["epidural"], n_slices=7, size=96, tilt_deg=18.0, encoding=encoding,
                            reverse_instances=True)
    paths = phantom.write_series(s, tmp_path)
    assert [int(d.InstanceNumber) for d in s.datasets] != list(range(1, 8))  # shuffled file order
    vol = load_volume(paths)
    assert [x.sop_instance_uid for x in vol.slices] == s.sop_uids_sorted
    assert np.array_equal(vol.hu, s.hu)
    assert vol.slice_spacing == pytest.approx(s.slice_spacing, abs=1e-3)
    assert vol.pixel_spacing[0] == pytest.approx(s.pixel_spacing, abs=1e-5)
    assert [x.instance_number for x in vol.slices] == list(range(7, 0, -1))
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert float(ds.ImageOrientationPatient[5]) == pytest.approx(-np.sin(np.radians(18.0)), abs=1e-5)
    if encoding == "rsna_quirk":
        assert ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100


def test_subtype_shapes() -> None:
    for subtype, seed in (("epidural", 40), ("subdural", 41), ("intraparenchymal", 42)):
        s = phantom.make_series(seed, subtypes=[subtype], n_slices=14, size=192, tilt_deg=0.0, **CLEAN)
        depths = []
        for k in np.flatnonzero(s.labels[:, CLASSES.index(subtype)]):
            m = mask_of(s, subtype)[k]
            bone = s.tissue[k] == T["bone"]
            dist = distance_transform_edt(~bone) * s.pixel_spacing  # mm to the nearest bone
            depths.append(dist[m].max())
            if subtype == "intraparenchymal":
                assert dist[m].min() > 3.0, "a parenchymal bleed must not touch the skull"
            else:
                assert (binary_dilation(m, iterations=2) & bone).any(), "must lie against the inner table"
        if subtype == "subdural":
            # A thin crescent (cuts near the vertex meet the layer obliquely and look thicker).
            assert np.median(depths) <= 12.0 + 2 * s.pixel_spacing
            assert len(depths) >= 3  # over a long arc
        if subtype == "epidural":
            assert max(depths) >= 6.0  # a thick lens


def test_ventricular_and_subarachnoid_blood_lie_in_csf_spaces() -> None:
    for subtype, seed in (("intraventricular", 50), ("subarachnoid", 51)):
        # A stack covering the whole head, so the bare twin samples the same levels.
        kw = {"n_slices": 40, "slice_spacing": 5.0, "size": 128, **CLEAN}
        s = phantom.make_series(seed, subtypes=[subtype], **kw)
        bare = phantom.make_series(seed, subtypes=[], **kw)  # the same head without blood
        assert np.array_equal(bare.tissue == T["bone"], s.tissue == T["bone"])
        m = mask_of(s, subtype)
        if subtype == "intraventricular":
            assert np.all(bare.tissue[m] == T["ventricle"])
        else:
            # CSF spaces (sulci a little widened, as blood distends them) and never the ventricles.
            assert np.isin(bare.tissue[m], [T["csf"], T["grey"]]).all()
            assert np.mean(bare.tissue[m] == T["csf"]) > 0.5
            assert not (bare.tissue[m] == T["ventricle"]).any()


def test_study_sharing_and_write_study(tmp_path: Path) -> None:
    shared = {"subtypes": [], "n_slices": 3, "size": 64, "study_instance_uid": "1.2.3.4", "patient_id": "P1"}
    a = phantom.make_series(60, **shared)
    b = phantom.make_series(61, series_number=3, **shared)
    assert a.study_instance_uid == b.study_instance_uid == "1.2.3.4"
    assert a.series_instance_uid != b.series_instance_uid
    paths = phantom.write_study([a, b], tmp_path)
    assert len(paths) == 6
    first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
    assert last.PatientID == "P1" and last.SeriesNumber == 3 and last.PatientName == "PHANTOM^P1"
    for keyword in ("PatientName", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        assert first.get(keyword) == last.get(keyword), keyword
    assert last.Manufacturer == "ihd-node phantom" and last.BodyPartExamined == "HEAD"
    assert str(phantom.make_series(62, subtypes=[], n_slices=1, size=64).datasets[0].PatientName) == "PHANTOM^62"


def test_rsna_layout(tmp_path: Path) -> None:
    csv_path = phantom.write_rsna_layout(tmp_path, 2, seed=70, subtypes=["subdural"], n_slices=4, size=64)
    assert csv_path == tmp_path / "stage_2_train.csv"
    with csv_path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"]
    body = rows[1:]
    assert len(body) == 2 * 4 * 6
    assert [r[0].rsplit("_", 1)[1] for r in body[:6]] == list(phantom.RSNA_ORDER)
    files = sorted((tmp_path / "stage_2_train").glob("ID_*.dcm"))
    assert len(files) == 8
    first = phantom.make_series(70, subtypes=["subdural"], n_slices=4, size=64)
    labels = {r[0]: int(r[1]) for r in body}
    for sop, row in zip(first.sop_uids_sorted, first.labels, strict=True):
        assert (tmp_path / "stage_2_train" / f"ID_{sop}.dcm").is_file()
        for cls, value in zip(CLASSES, row, strict=True):
            assert labels[f"ID_{sop}_{cls}"] == value
    assert sum(labels[k] for k in labels if k.endswith("_subdural")) > 0


def test_cli_writes_series_and_refuses_unknown_subtypes(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(["phantom", str(tmp_path / "out"), "--subtypes", "epidural", "--slices", "4",
                   "--size", "64", "--series", "2", "--seed", "5"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("epidural" in line and "2.25." in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["phantom_5", "phantom_6"]
    assert len(list((tmp_path / "out" / "phantom_5").glob("*.dcm"))) == 4
    rc = cli_main(["phantom", str(tmp_path / "rsna"), "--rsna-layout", "--slices", "3", "--size", "64",
                   "--subtypes", "none"])
    assert rc == 0 and (tmp_path / "rsna" / "stage_2_train.csv").is_file()
    assert "no hemorrhage" in capsys.readouterr().out
    rc = cli_main(["phantom", str(tmp_path / "bad"), "--subtypes", "epidural", "bleed"])
    err = capsys.readouterr().err
    assert rc == 2 and "'bleed'" in err and "intraventricular" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("encoding", ["int16", "rsna_quirk"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, encoding: str) -> None:
    s = phantom.make_series(80, subtypes=["subdural"], n_slices=2, size=64, encoding=encoding, tilt_deg=12.0)
    path = phantom.write_series(s, tmp_path)[0]
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "CTImage" in report
    assert not [line for line in report.splitlines() if "Error" in line], report


def fingerprint(series: phantom.PhantomSeries) -> str:
    """SHA-256 over every header element (file order), the stored pixels and the truth arrays."""
    h = hashlib.sha256()
    for ds in series.datasets:
        h.update(str(ds.file_meta.TransferSyntaxUID).encode())
        for elem in ds:
            value = elem.value if elem.tag != 0x7FE00010 else hashlib.sha256(elem.value).hexdigest()
            h.update(f"{elem.tag}|{elem.VR}|{value!r}\n".encode())
    for array in (series.hu, series.tissue, series.masks, series.labels):
        h.update(str(array.dtype).encode() + str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    h.update(repr((series.sop_uids_sorted, series.subtypes, series.pixel_spacing, series.slice_spacing,
                   series.tilt_deg, series.encoding, series.partial_volume)).encode())
    return h.hexdigest()


# Hashes taken from the generator before it was split into modules: a refactor must not move one bit.
GOLDEN = [
    ((1, None, None, 96, {}),
     "d4801ab3ab142bff1a2b3f49232f945f6b7f9205eac55b28d8f4849be601d157"),
    ((7, ["subdural", "intraparenchymal"], 14, 128, {"tilt_deg": 15.0, "encoding": "uint12"}),
     "4fdcf654ca8586f040ccc74e2a2b5b5e94a7d9f529d50d5af9853a5ac5f6012f"),
    ((3, ["intraventricular", "subarachnoid", "epidural"], 20, 128,
      {"thin": True, "padding": True, "encoding": "rsna_quirk", "mass_effect": True}),
     "ffe3e1f978efc7ca794b1d895ec5fb508a16d15dd62db16cc9e54e0f70546880"),
    ((11, ["any"], 10, 64, {"encoding": "slope_half", "shuffle": False, "reverse_instances": True,
                            "headrest": True, "rotation_deg": 8.0, "offset_mm": (5.0, -3.0)}),
     "2b20e528c806850c0a768f076bd4d6d832086743b8616dac9fad759c821cb6f7"),
    ((5, ["subdural"], 8, 512, {"partial_volume": True}),
     "61b31ab2e8b85212a565b2ad634d7d994ae4f42d25ce5eb0d3ca5105ba90b793"),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_same_seed_gives_bit_identical_series(args: tuple, expected: str) -> None:
    seed, subtypes, n_slices, size, variation = args
    s = phantom.make_series(seed, subtypes=subtypes, n_slices=n_slices, size=size, **variation)
    assert fingerprint(s) == expected
