"""Late instances and the disk.

- Slices of a series that was already analysed and delivered arrive later: the series is analysed again,
  a revised SR (new SOP Instance in a new SR series) names the earlier SR in its
  PredecessorDocumentsSequence, and the captures of the revision form a new SC series (UIDs from
  ihd_node.uids with the revision in them); nothing of the first result is sent again.
- Free disk under storage.min_free_mb: every C-STORE is answered 0xA700 (Out of Resources) and nothing
  is written; restarted with a normal watermark, the node takes the same study.
- retention.spool_keep_hours: once a series is delivered and the keep time has passed, its spool files
  (and Grad-CAM files) go; the database rows and the SR stay. A late slice after that cannot be
  analysed with its series any more: the series is failed with that reason.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pydicom
import yaml
from conftest import wait_until
from faults import (
    KOS_CLASS,
    SC_CLASS,
    SEG_CLASS,
    SR_CLASS,
    check_results_once,
    done,
    instance_rows,
    make_study,
    start,
    store,
)
from heads import full_head_spacing

from ihd_node.uids import result_uid

N = 24


def with_spare(late: int) -> float:
    """Slice spacing at which the N - `late` upper slices already span the head: the `late` lowest ones are
    spare, so the series is complete (evidence on) before they come."""
    return full_head_spacing(N - late)


def test_late_slices_give_a_revised_sr_and_a_new_capture_series(tmp_path: Path, pacs, make_node) -> None:
    study = make_study(tmp_path / "study", seed=31, n_slices=N, slice_spacing=with_spare(2))
    node = start(make_node(pacs, analysis={"max_secondary_captures": 3}))
    first, late = study.files[2:], study.files[:2]  # the lowest two slices (in space) come late
    assert store(first, node.port) == [0x0000] * (N - 2)
    assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
    r0 = {o.sop_instance_uid: o for o in pacs.objects(study.study_uid)}
    core = [o for o in r0.values() if o.sop_class_uid in (SR_CLASS, SC_CLASS)]
    assert len(core) == 5 and len(r0) - len(core) <= 2  # SR, summary capture, 3 slice captures; SEG, key images

    assert store(late, node.port) == [0x0000] * 2
    assert wait_until(lambda: node.query("SELECT count(*) FROM analyses")[0][0] == 2, 60), node.log()[-3000:]
    assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
    late_events = "SELECT count(*) FROM events WHERE kind = 'received' AND message LIKE 'late instance%'"
    assert node.query(late_events)[0][0] == 1

    found = check_results_once(pacs, node, study)
    assert not found.duplicates and sorted(found.revisions) == [1, 2]
    assert node.query("SELECT revision, n_slices FROM analyses ORDER BY revision") == [(1, N - 2), (2, N)]
    assert node.query("SELECT revision FROM series")[0][0] == 2
    # Nothing of the first result went out twice; the revision added its own SR and captures.
    objects = pacs.objects(study.study_uid)
    extra = sum(o.sop_class_uid in (SEG_CLASS, KOS_CLASS) for o in objects[len(r0):])
    assert objects[:len(r0)] == list(r0.values()) and extra <= 2
    assert len(objects) == len(r0) + 1 + found.revisions[2]["n_sc"] + extra

    name, version, key = node.query("SELECT model_name, model_version, settings_key FROM analyses LIMIT 1")[0]
    uid = lambda role, rev, index=0: result_uid(study.series_uid, name, version, role, index, rev,  # noqa: E731
                                                settings=key)
    sr0 = pydicom.dcmread(pacs.folder / f"{found.revisions[1]['sr']}.dcm")
    sr1 = pydicom.dcmread(pacs.folder / f"{found.revisions[2]['sr']}.dcm")
    assert (sr0.SOPInstanceUID, sr1.SOPInstanceUID) == (uid("sr", 0), uid("sr", 1))
    assert (sr0.SeriesInstanceUID, sr1.SeriesInstanceUID) == (uid("sr-series", 0), uid("sr-series", 1))
    assert (sr0.InstanceNumber, sr1.InstanceNumber) == (1, 2)
    assert "PredecessorDocumentsSequence" not in sr0
    pred = sr1.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == study.study_uid
    assert pred.ReferencedSeriesSequence[0].SeriesInstanceUID == sr0.SeriesInstanceUID
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (SR_CLASS, sr0.SOPInstanceUID)
    assert sr1.StudyInstanceUID == sr0.StudyInstanceUID == study.study_uid

    # Captures: one SC series per revision, never mixed; the revision's captures cite the whole series.
    by_rev = {r: [pydicom.dcmread(o.path) for o in objects
                  if o.sop_class_uid == SC_CLASS and o.series_instance_uid == uid("sc-series", r)]
              for r in (0, 1)}
    assert len(by_rev[0]) == 4 and len(by_rev[1]) == found.revisions[2]["n_sc"] > 0  # summary + 3
    assert uid("sc-series", 0) != uid("sc-series", 1)
    assert all(o.series_instance_uid in (uid("sc-series", 0), uid("sc-series", 1))
               for o in objects if o.sop_class_uid == SC_CLASS)
    first_sops, all_sops = {study.sop_of[p] for p in first}, set(study.sop_uids)
    for rev, allowed in ((0, first_sops), (1, all_sops)):
        cited = {item.ReferencedSOPInstanceUID for ds in by_rev[rev] for item in ds.SourceImageSequence}
        assert cited <= allowed
        assert sorted(int(ds.InstanceNumber) for ds in by_rev[rev]) == list(range(1, len(by_rev[rev]) + 1))
    # The node keeps each revision's files apart: results/<series>/r0 and r1.
    folders = sorted(p.name for p in (node.state_dir / "results" / study.series_uid).iterdir())
    assert folders == ["r0", "r1"]
    print(f"\nFIGURE late: r0 SR {sr0.SOPInstanceUID} + {len(by_rev[0])} SC; r1 SR {sr1.SOPInstanceUID} "
          f"(predecessor r0) + {len(by_rev[1])} SC in a new series")
    done(node)


def test_below_free_space_watermark_refuses_with_a700_then_accepts(tmp_path: Path, pacs, make_node) -> None:
    study = make_study(tmp_path / "study", seed=32, n_slices=N)
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    node = make_node(pacs, storage={"min_free_mb": free_mb + 100_000})
    start(node)
    assert store(study.files, node.port) == [0xA700] * N
    assert node.query("SELECT count(*) FROM instances")[0][0] == 0
    assert node.query("SELECT count(*) FROM series")[0][0] == 0
    assert not list((node.state_dir / "spool").glob("*/*/*.dcm"))
    refused = node.query("SELECT message, calling_aet FROM events WHERE kind = 'rejected'")
    assert len(refused) == N and all("0xA700" in m and "storage.min_free_mb" in m for m, _ in refused)
    assert node.process.poll() is None  # refusing is not failing: the node keeps serving
    assert node.terminate() == 0

    # An admin frees space (here: lowers the watermark under the free space) and restarts the node.
    node.config["storage"]["min_free_mb"] = max(1, free_mb // 2)
    node.config_path.write_text(yaml.safe_dump(node.config))
    start(node)
    assert store(study.files, node.port) == [0x0000] * N
    assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
    assert not check_results_once(pacs, node, study).duplicates
    print(f"\nFIGURE disk: {N}/{N} C-STORE answered 0xA700 with min_free_mb {free_mb + 100_000} "
          f"(free {free_mb} MB); {N}/{N} stored with min_free_mb {max(1, free_mb // 2)}")
    done(node)


def test_spool_removed_after_delivery_when_keep_time_passed(tmp_path: Path, pacs, make_node) -> None:
    study = make_study(tmp_path / "study", seed=33, n_slices=N, slice_spacing=with_spare(1))
    keep_hours = 0.0003  # 1.08 s
    # max_wait 5 s: the late slice below reopens a series whose other files are gone, so the completion checks
    # cannot read them and hold it until max_wait (fail closed) before the analysis says why it cannot run.
    node = start(make_node(pacs, retention={"spool_keep_hours": keep_hours}, series={"max_wait_seconds": 5.0}))
    assert store(study.files[1:], node.port) == [0x0000] * (N - 1)
    assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
    spool = node.state_dir / "spool" / study.study_uid / study.series_uid
    assert len(list(spool.glob("*.dcm"))) == N - 1
    assert wait_until(lambda: node.query("SELECT spool_removed FROM series")[0][0] is not None, 30)
    assert not spool.exists()
    delivered, removed = node.query("SELECT delivered, spool_removed FROM series")[0]
    waited = (datetime.fromisoformat(removed) - datetime.fromisoformat(delivered)).total_seconds()
    assert waited >= keep_hours * 3600 - 0.05, waited
    # Rows stay: series, instances (their paths now point at nothing), analysis, outbox; the SR stays.
    assert node.series_state(study.series_uid) == "delivered"
    assert len(instance_rows(node, study.series_uid)) == N - 1
    assert node.query("SELECT count(*) FROM analyses")[0][0] == 1
    assert node.query("SELECT count(*) FROM deliveries WHERE status = 'sent' AND sop_class_uid IN (?, ?)",
                      SR_CLASS, SC_CLASS)[0][0] == 4  # SR, summary, 2 SCs (the SEG and key images besides)
    results = node.state_dir / "results" / study.series_uid / "r0"
    assert len(list(results.glob("SR_*.dcm"))) == 1 and not list(results.glob("SC_*.dcm"))
    assert "retention.spool_removed" in node.log()

    # A late slice now: the earlier slices are gone, so the series cannot be analysed again; said so.
    assert store(study.files[:1], node.port) == [0x0000]
    assert node.wait_state(study.series_uid, ("failed",), 30) == "failed"
    reason = node.query("SELECT reason FROM series")[0][0]
    assert "files were removed" in reason and "spool_keep_hours" in reason, reason
    print(f"\nFIGURE retention: spool removed {waited:.2f} s after delivery (keep {keep_hours} h)")
    done(node)
