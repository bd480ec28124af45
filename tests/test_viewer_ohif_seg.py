"""OHIF (published build, headless Chromium, over Orthanc's DICOMweb) overlays the node's Segmentation on
the CT: the segment's colour is lit where the attention region is and nowhere else on the head.

The study is a small phantom head with a bleed on every slice and the attention region over it (so
whichever slice OHIF opens on carries the region); the results are built by the report code and stored in
Orthanc with the CT. The screenshot's image-to-screen mapping is measured from the head itself (its
bounding box on screen against the HU image), not assumed from OHIF's layout. Screenshot:
tests/artifacts/ohif-seg.png.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from orthanc import Orthanc
from scipy import ndimage
from test_report_common import make_prediction, write_ct_series
from test_viewer_ohif import ARTIFACTS, CHROMIUM, FLAGS, pytestmark  # noqa: F401 (the same skips)
from viewer import ViewerServer

from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.regions import attention_mask
from ihd_node.report.seg import SEGMENT_COLOURS
from ihd_node.report.sr import reported_classes
from ihd_node.sim.mini_pacs import free_port

SIZE, SLICES, CLASS = 256, 5, "subdural"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Orthanc (DICOMweb) holding the phantom CT and all its results; yields (orthanc, volume, mask)."""
    tmp = tmp_path_factory.mktemp("ohif-seg")
    files = write_ct_series(tmp / "ct", n=SLICES, size=SIZE, bleed_slices=tuple(range(SLICES)))
    volume = load_volume(files)
    prediction = make_prediction(SLICES, {CLASS: list(range(SLICES))}, size=SIZE)
    assert reported_classes(prediction) == [CLASS]
    results = build_results(volume, prediction)
    assert results.segmentation is not None
    orthanc = Orthanc(tmp / "orthanc", ai_ae_title="IHD_AI", ai_port=free_port(), dicomweb=True).start()
    try:
        for f in files:
            orthanc.upload(f)
        for k, ds in enumerate(results.all()):
            path = tmp / f"result{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            orthanc.upload(path)
        mask = attention_mask(prediction.heatmaps[(0, CLASS)])  # the same on every slice
        yield orthanc, volume, mask
    finally:
        orthanc.stop()


def _head_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) on screen of the largest bright grey blob: the head (the viewport's text
    overlays are small separate blobs)."""
    grey = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int) < 30
    bright = grey & (rgb.mean(axis=2) > 40)
    labels, n = ndimage.label(ndimage.binary_closing(bright, iterations=2))
    assert n, "nothing bright on screen: the CT is not shown"
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def _expected_on_screen(volume, mask: np.ndarray, box: tuple[int, int, int, int], shape) -> np.ndarray:
    """The region's pixels mapped to screen, by the linear map that takes the head's image bounding box
    (HU above -300: skull and brain) onto its screen bounding box."""
    rows, cols = np.nonzero(volume.hu[0] > -300)
    top, left, bottom, right = box
    sy = (bottom - top) / (rows.max() + 1 - rows.min())
    sx = (right - left) / (cols.max() + 1 - cols.min())
    screen = np.zeros(shape, bool)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img_r = ((yy + 0.5 - top) / sy + rows.min()).astype(int)
    img_c = ((xx + 0.5 - left) / sx + cols.min()).astype(int)
    inside = (img_r >= 0) & (img_r < mask.shape[0]) & (img_c >= 0) & (img_c < mask.shape[1])
    screen[inside] = mask[img_r[inside], img_c[inside]]
    return screen


def test_ohif_overlays_the_segmentation_on_the_ct(study) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    orthanc, volume, mask = study
    ARTIFACTS.mkdir(exist_ok=True)
    server = ViewerServer(orthanc.http_port).start()
    shot = ARTIFACTS / "ohif-seg.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(120_000)
                page.goto(f"{server.url}/viewer?StudyInstanceUIDs={volume.study_instance_uid}")
                page.get_by_text("Skip all").click()  # OHIF's first-visit tour
                page.locator("[data-series]").filter(has_text="ICH AI Attention").first.dblclick()
                canvas = page.locator("canvas").first
                canvas.wait_for()
                # OHIF previews the SEG over its CT and asks whether to open (hydrate) it: yes.
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    yes = page.get_by_role("button", name="Yes")
                    if yes.count():
                        yes.first.click()
                        break
                    time.sleep(1)
                time.sleep(8)  # the overlay renders after the segmentation is loaded
                page.screenshot(path=str(shot))
                box = canvas.bounding_box()
            finally:
                browser.close()
    finally:
        server.stop()

    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"))
    x0, y0 = int(box["x"]), int(box["y"])
    view = rgb[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    head = _head_box(view)
    expected = _expected_on_screen(volume, mask, head, view.shape[:2])
    assert expected.sum() > 50, "the region maps to too few screen pixels to judge"
    # Lit: the segment's colour blended over the grey CT: the pixel's departure from its own grey points
    # the way the colour's does (cosine above 0.9) and is clearly not grey.
    want = np.asarray(SEGMENT_COLOURS[CLASS], float)
    want -= want.mean()
    departure = view.astype(float) - view.astype(float).mean(axis=2, keepdims=True)
    size = np.linalg.norm(departure, axis=2)
    lit = (size > 25) & ((departure @ want) > 0.9 * size * np.linalg.norm(want))
    top, left, bottom, right = head
    on_head = np.zeros_like(lit)
    on_head[top:bottom, left:right] = True
    near = ndimage.binary_dilation(expected, iterations=4)
    core = ndimage.binary_erosion(expected, iterations=4)
    lit_on_head = lit & on_head
    print(f"lit on head {int(lit_on_head.sum())}, region {int(expected.sum())}, core lit "
          f"{int((lit & core).sum())}/{int(core.sum())}, lit away {int((lit_on_head & ~near).sum())}")
    assert lit_on_head.any(), f"no overlay colour on the CT: see {shot}"
    assert (lit & core).sum() >= 0.8 * core.sum(), f"the region is not lit: see {shot}"
    assert (lit_on_head & ~near).sum() <= 0.02 * lit_on_head.sum(), f"colour away from the region: see {shot}"
