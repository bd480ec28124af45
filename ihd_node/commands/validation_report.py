"""`ihd-node validation-report --out FILE.html`: the local validation report a department files before go-live
(and again after): the cohort, every figure with its 95 % interval and the few-reads words, calibration,
operating points, drift, the model card's figures beside the local ones, and NOT FOR DIAGNOSTIC USE.

One self-contained HTML file: the style and the SVG charts are inline, nothing is fetched. With `--pdf FILE`
the same page is printed by headless Chromium when it is installed (`chromium --headless --print-to-pdf`).
It only reads the log database and the checkpoint's model card; the node may be running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ihd_node import __version__
from ihd_node.commands.performance import model_card, parse_when
from ihd_node.commands.readout import open_existing
from ihd_node.config import load_config
from ihd_node.errors import UserError
from ihd_node.monitoring import local_performance
from ihd_node.monitoring.drift import drift_report
from ihd_node.store import utcnow
from ihd_node.web.console import TEMPLATES
from ihd_node.web.performance_view import performance_context

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PDF_SECONDS = 120


def render_report(config_path: str, since: Any = None, until: Any = None) -> str:
    config = load_config(config_path)
    db = open_existing(config_path)
    try:
        perf = local_performance(db, since=since, until=until, model_card=model_card(config_path))
        drift = drift_report(db, config.monitoring) if config.monitoring.drift else None
        episodes = db.drift_episodes(20)
    finally:
        db.close()
    url = config.database_url
    shown = url.split("@")[-1] if "@" in url else url  # never a password
    return TEMPLATES.get_template("validation_report.html").render(
        node=config.node.ae_title, version=__version__, database=shown, written=utcnow(), episodes=episodes,
        **performance_context(perf, drift))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def print_pdf(html: Path, pdf: Path) -> None:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise UserError("--pdf needs Chromium (apt install chromium); the HTML report was written, print it "
                        "from a browser instead")
    with tempfile.TemporaryDirectory(prefix="ihd-report-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--no-pdf-header-footer", f"--print-to-pdf={pdf.resolve()}", html.resolve().as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PDF_SECONDS)
        except subprocess.TimeoutExpired:
            raise UserError(f"{browser} did not print the PDF within {PDF_SECONDS} s; the HTML report was "
                            "written") from None
    if done.returncode != 0 or not pdf.is_file() or pdf.stat().st_size == 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{browser} could not print the PDF ({last}); the HTML report was written")


def validation_report_command(args: Any) -> int:
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until, end=True) if args.until else None
    if since and until and since >= until:
        raise UserError(f"--since {args.since} is not before --until {args.until}; swap them")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'validation.html'}")
    write_atomic(out, render_report(args.config, since, until))
    print(f"wrote {out} (NOT FOR DIAGNOSTIC USE)")
    if args.pdf:
        print_pdf(out, Path(args.pdf))
        print(f"wrote {args.pdf}")
    return 0
