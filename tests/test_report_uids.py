"""Result UIDs: every content-changing setting is part of them, they are version-5 UUIDs, the Device
Observer UID is per installation, and result series numbers never collide within a study."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from test_report_common import make_prediction, make_volume

from ihd_node.report import ResultSettings, build_results
from ihd_node.site import SITE_FILE, site_value
from ihd_node.uids import derived_uid, result_series_numbers, result_uid


def uids(results) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in results.all()] + [str(results.sr.SeriesInstanceUID)]


@pytest.fixture
def case(tmp_path):
    return make_volume(tmp_path, n=6, bleed_slices=(2, 3)), make_prediction(6, {"subdural": [2, 3]})


def test_uids_are_version5_uuids():
    for parts in (("a",), ("ihd-node", "1.2.3", "m", "1", "sr", 0, 0)):
        uid = derived_uid(*parts)
        value = uuid.UUID(int=int(uid.removeprefix("2.25.")))
        assert value.version == 5 and value.variant == uuid.RFC_4122, uid
        assert len(uid) <= 64


def test_every_content_changing_setting_changes_the_uids(case):
    volume, prediction = case
    base = ResultSettings(dict(prediction.model.thresholds))
    reference = uids(build_results(volume, prediction, settings=base))
    assert uids(build_results(volume, prediction, settings=base)) == reference  # deterministic
    lower = {**prediction.model.thresholds, "subdural": 0.3}
    changed = {
        "threshold": replace(base, thresholds=lower),
        "capture cap": replace(base, max_secondary_captures=1),
        "thin-slice limit": replace(base, thin_slice_mm=2.0),
        "slab thickness": replace(base, slab_mm=7.5),
        "grad-cam off": replace(base, gradcam=False),
        "explain": replace(base, explain="cnn"),
    }
    for what, settings in changed.items():
        other = uids(build_results(volume, prediction, settings=settings))
        assert not set(other) & set(reference), what
    # Without explicit settings the prediction's own thresholds still count.
    moved = replace(prediction, model=replace(prediction.model, thresholds=lower))
    assert not set(uids(build_results(volume, moved))) & set(uids(build_results(volume, prediction)))


def device_uid(sr) -> str:
    def walk(items):
        for item in items:
            if item.ValueType == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "121012":
                yield item.UID
            yield from walk(item.get("ContentSequence", []))
    return next(walk(sr.ContentSequence))


def test_device_observer_uid_is_per_installation(case, tmp_path):
    volume, prediction = case
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    site_a, site_b = site_value(tmp_path / "a"), site_value(tmp_path / "b")
    assert site_a != site_b and len(site_a) == 32
    assert site_value(tmp_path / "a") == site_a  # kept across restarts
    assert (tmp_path / "a" / SITE_FILE).stat().st_mode & 0o777 == 0o600
    a = device_uid(build_results(volume, prediction, site=site_a).sr)
    b = device_uid(build_results(volume, prediction, site=site_b).sr)
    assert a != b
    assert a == result_uid("", prediction.model.name, prediction.model.version, "device", site=site_a)
    (tmp_path / "a" / SITE_FILE).write_text("not a site value\n")
    with pytest.raises(ValueError, match="site value"):
        site_value(tmp_path / "a")


def test_series_numbers_do_not_collide_in_a_study(case):
    volume, prediction = case
    numbers = []
    for source in (3, 4, 30):
        volume.headers[0].SeriesNumber = source
        for revision in (0, 1, 2):
            results = build_results(volume, prediction, revision=revision)
            sr, sc = results.sr.SeriesNumber, results.secondary_captures[0].SeriesNumber
            assert (sr, sc) == result_series_numbers(source, revision)
            numbers += [sr, sc]
    assert len(set(numbers)) == len(numbers) == 18
    assert result_series_numbers(30, 2) == (90030020, 90030021)
    assert result_series_numbers(None, 0) == (90000000, 90000001)
