"""What the ER doctor sees, in a real viewer: OHIF (published build) in headless Chromium, over Orthanc.

Orthanc (with its DICOMweb plugin) holds a phantom study with a subdural bleed and routes it to the node;
the node's SR and captures come back into Orthanc. OHIF, served on a local port with /dicom-web proxied
to Orthanc (one origin), opens the study; the SR opened in its SR viewport must draw the finding's
outline over the CT with the finding's label and its probability in percent; the summary capture must open.
OHIF runs with the one configuration line the README gives sites (tests/viewer.py: its SR handler needs
it for the SR's six findings, measurement groups without coordinates). Screenshots are saved in
tests/artifacts/ (git-ignored). Needs Orthanc + orthanc-dicomweb, /usr/bin/chromium, playwright (PyPI,
no browser download: the system Chromium is used) and OHIF unpacked by `make viewer` (npm).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from pathlib import Path

import pytest
from heads import full_head
from loopback import destination, node_config, wait_finished
from orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc
from viewer import OHIF_DIST, ViewerServer

from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import free_port
from ihd_node.sim.phantom import write_series

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(ORTHANC_BINARY is None, reason="Orthanc is not installed (Debian package orthanc)"),
    pytest.mark.skipif(DICOMWEB_PLUGIN is None,
                       reason="the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"),
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(not (OHIF_DIST / "index.html").exists(),
                       reason="OHIF is not unpacked: `make viewer` (needs npm) puts @ohif/app into .viewer/"),
    pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the shipped default model is missing"),
]


# Skull base to vertex at 5.4 mm, as the shipped model saw in training; completion evidence as shipped.
HEAD_SLICES = 36


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Orthanc holding a phantom study and the node's results for it; yields (orthanc, study UID)."""
    tmp = tmp_path_factory.mktemp("ohif")
    node_port = free_port()
    orthanc = Orthanc(tmp / "orthanc", ai_ae_title="IHD_AI", ai_port=node_port, dicomweb=True).start()
    node = None
    try:
        config = node_config(
            tmp / "node", [destination("orthanc", orthanc.aet, orthanc.dicom_port)], port=node_port,
            series={"quiet_seconds": 1},
            analysis={"max_secondary_captures": 4})
        node = Node(config).start()
        series = full_head(101, ["subdural"], n_slices=HEAD_SLICES, size=512)
        files = write_series(series, tmp / "study")
        study_id = {orthanc.upload(f)["ParentStudy"] for f in files}.pop()
        orthanc.post("/modalities/ai/store", {"Resources": [study_id], "Synchronous": True})
        state = wait_finished(node, series.series_instance_uid, 180)
        assert state is not None and state.state == "delivered", state
        modalities = {orthanc.get(f"/series/{s}")["MainDicomTags"].get("Modality")
                      for s in orthanc.get(f"/studies/{study_id}")["Series"]}
        assert modalities == {"CT", "SR", "OT", "SEG", "KO"}
        node.stop()
        node = None
        yield orthanc, series.study_instance_uid
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def _small_copy(png: Path, box: dict, out: Path, width: int = 560) -> None:
    """The viewport cut out and shrunk, 64 colours: the README's picture (docs/ohif-sr.png is a copy)."""
    from PIL import Image

    with Image.open(png) as image:
        crop = image.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                           int(box["y"] + box["height"])))
        crop = crop.resize((width, round(crop.height * width / crop.width)), Image.Resampling.LANCZOS)
        crop.convert("RGB").quantize(64).save(out, optimize=True)


def _svg_layer(page) -> str:
    layers = page.locator("svg.svg-layer")
    return "".join(layers.nth(k).inner_html() for k in range(layers.count()))


def test_ohif_draws_the_sr_region_with_its_label_and_opens_the_summary_capture(study) -> None:
    from playwright.sync_api import sync_playwright

    orthanc, study_uid = study
    ARTIFACTS.mkdir(exist_ok=True)
    server = ViewerServer(orthanc.http_port).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors: list[str] = []  # the viewer's own errors: why an SR does not load, if it does not
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.set_default_timeout(120_000)
                page.goto(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
                skip = page.get_by_text("Skip all")  # OHIF's first-visit tour
                skip.click()

                # The SR: double-click its entry in the study browser; the SR viewport loads the CT slice
                # of the first region and draws the outline with the label.
                # (found by description: result series numbers are derived per study and revision)
                page.locator("[data-series]").filter(has_text="ICH AI Results").first.dblclick()
                canvas = page.locator("canvas").first
                canvas.wait_for()
                drawn = ""
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    drawn = _svg_layer(page)
                    if "<polyline" in drawn and "Subdural hemorrhage" in drawn:
                        break
                    # The SR viewport draws on the next render: scroll one image away and back.
                    box = canvas.bounding_box()
                    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                    page.mouse.wheel(0, 120)
                    time.sleep(2)
                    page.mouse.wheel(0, -120)
                    time.sleep(3)
                page.screenshot(path=str(ARTIFACTS / "ohif-sr.png"))
                _small_copy(ARTIFACTS / "ohif-sr.png", canvas.bounding_box(), ARTIFACTS / "ohif-sr-small.png")
                assert "<polyline" in drawn, f"the SR region is not drawn; viewer errors: {errors[-5:]}"
                assert "Subdural hemorrhage" in drawn, "the finding's label is not shown"
                # The probability in percent, as the SR carries it (UCUM "%"), not a raw "{probability}".
                label = re.search(r"Subdural hemorrhage: (\d+\.\d\d) %", drawn)
                assert label and 50 <= float(label.group(1)) <= 100, drawn
                assert "{probability}" not in drawn
                points = drawn.split('<polyline points="', 1)[1].split('"', 1)[0].split()
                assert len(points) >= 4  # an outline, not a point or a line

                # The summary capture: instance 1 of the capture series.
                page.locator("[data-series]").filter(has_text="ICH AI Grad-CAM").first.dblclick()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and "I:1 (1/" not in page.inner_text("body"):
                    time.sleep(1)
                time.sleep(3)
                page.screenshot(path=str(ARTIFACTS / "ohif-summary-capture.png"))
                assert "I:1 (1/" in page.inner_text("body"), "the summary capture did not open"
            finally:
                browser.close()
    finally:
        server.stop()
