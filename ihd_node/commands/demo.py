"""`ihd-node demo`: the whole job end to end on this machine, with no configuration.

Starts the node on free ports with temporary storage and the shipped model, starts a small receiving
PACS, makes one phantom head-CT study with a hemorrhage and one without, sends both over C-STORE,
waits for the SR and Grad-CAM images to come back, and prints what the ER doctor would see.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import pydicom
from sqlalchemy.engine import make_url

from ihd_node import nodelog
from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.config import default_config
from ihd_node.errors import UserError
from ihd_node.report.codes import FINDING_CODES
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_files

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
STUDIES = (("with hemorrhage", ["intraparenchymal", "intraventricular"], 11), ("without hemorrhage", [], 12))
RESULT_TIMEOUT_S = 180


def sr_findings(path: Path) -> list[str]:
    """Read the findings back from the SR the PACS received as any TID 1500 consumer would, through
    highdicom's reader (not the node's code): one line per class (finding, Present/Absent, the series
    probability), then the outlines on the key slices in one line, if there are any."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    report = hd.sr.MeasurementReport.from_sequence([pydicom.dcmread(path)])
    names = {code.value: cls for cls, code in FINDING_CODES.items()}
    lines = []
    for group in report.get_image_measurement_groups():
        finding = group.finding_type
        states = [e.value.meaning for e in group.get_qualitative_evaluations() if e.name == finding]
        probabilities = [f"{m.value:.1f} {m.unit.value}" for m in group.get_measurements(name=codes.DCM.Probability)]
        lines.append(f"{finding.meaning + ' (' + names.get(finding.value, '?') + ')':<47} "
                     f"{(states or ['?'])[0]:<8} p = {(probabilities or ['?'])[0]}")
    regions = [g.tracking_identifier for g in report.get_planar_roi_measurement_groups()]
    if regions:
        lines.append(f"outlined on {len(regions)} key slice(s): {'; '.join(r for r in regions if r)}")
    return lines


def demo_command(args: argparse.Namespace) -> int:
    from ihd_node.node.wiring import Node
    from ihd_node.sim.phantom import make_series, write_series

    # The node's own event log goes to the log database here; the terminal shows what a person wants to see.
    nodelog.setup(level=logging.WARNING)
    keep = bool(getattr(args, "keep", False))
    workdir = Path(tempfile.mkdtemp(prefix="ihd-node-demo-"))
    print(f"ihd-node demo — {NOT_FOR_DIAGNOSTIC_USE}; the shipped model is trained on synthetic head CTs only.")
    print(f"working folder: {workdir}" + ("" if keep else " (removed at the end; --keep keeps it)"))
    pacs = node = None
    try:
        pacs = MiniPACS(workdir / "pacs", ae_title="DEMO_PACS").start()
        node_port = free_port()
        config = default_config(
            workdir / "node",
            node={"ae_title": "IHD_AI", "host": "127.0.0.1", "port": node_port},
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        )
        node = Node(config)
        node.start()
        print(f"node IHD_AI listening on 127.0.0.1:{node_port}; receiving PACS DEMO_PACS on 127.0.0.1:{pacs.port}")
        failures = 0
        for label, subtypes, seed in STUDIES:
            # 5.5 mm: the 28 slices reach from below the skull base to the vertex, as the node expects
            series = make_series(seed, subtypes=subtypes, n_slices=28, slice_spacing=5.5)
            files = write_series(series, workdir / "studies" / label.replace(" ", "-"))
            started = time.time()
            statuses = send_files(files, host="127.0.0.1", port=node_port, called_aet="IHD_AI",
                                  calling_aet=pacs.ae_title)
            sent = time.time()
            bad = [s for s in statuses if s != 0]
            print(f"\nstudy {label}: sent {len(files)} slices in {sent - started:.1f} s"
                  f"{f' ({len(bad)} refused)' if bad else ''}; truth: {', '.join(subtypes) or 'no hemorrhage'}")
            objects = wait_for_results(pacs, series.study_instance_uid, sent)
            if not objects:
                print(f"  no results within {RESULT_TIMEOUT_S} s — see `ihd-node status` and the log above")
                failures += 1
                continue
            srs = [o for o in objects if o.sop_class_uid.startswith(SR_STORAGE_PREFIX)]
            scs = [o for o in objects if not o.sop_class_uid.startswith(SR_STORAGE_PREFIX)]
            done = max(o.received_at for o in objects)
            print(f"  time to result: {done - sent:.1f} s after the last slice was sent")
            findings = sr_findings(srs[0].path)
            for line in findings:
                print(f"  {line}")
            said_ich = any(line.startswith("Intracranial hemorrhage (any)") and " Present " in line
                           for line in findings)
            print(f"  the model {'agrees' if said_ich == bool(subtypes) else 'DISAGREES'} with the phantom's truth "
                  f"({'hemorrhage' if subtypes else 'no hemorrhage'})")
            # Paths only when they will still exist after the demo.
            print(f"  SR: {srs[0].path if keep else srs[0].path.name}")
            print(f"  Grad-CAM images: {len(scs)}"
                  + (f", e.g. {scs[0].path if keep else scs[0].path.name}" if scs else ""))
        print(f"\n{NOT_FOR_DIAGNOSTIC_USE}.")
        if keep:
            database = make_url(config.database_url).database
            print(f"Kept: the PACS folder with all results {pacs.folder}; the node's log database "
                  f"{database} (sqlite3 -readonly FILE, or ihd-node status with a config whose "
                  f"storage.dir is {config.storage.dir}).")
        else:
            print(f"Nothing kept: {workdir} is removed now (ihd-node demo --keep keeps the results and the "
                  "log database).")
        return 1 if failures else 0
    finally:
        if node is not None:
            node.stop()
        if pacs is not None:
            pacs.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_for_results(pacs: MiniPACS, study_uid: str, since: float) -> list:
    """Wait until the SR arrived and the secondary captures stopped coming (they are sent after the SR)."""
    deadline = time.time() + RESULT_TIMEOUT_S
    while time.time() < deadline:
        objects = pacs.objects(study_uid)
        if any(o.sop_class_uid.startswith(SR_STORAGE_PREFIX) for o in objects) and \
                time.time() - max(o.received_at for o in objects) > 1.5:
            return objects
        time.sleep(0.2)
    if not pacs.objects(study_uid):
        raise UserError(f"no result for study {study_uid} within {RESULT_TIMEOUT_S} s")
    return pacs.objects(study_uid)
