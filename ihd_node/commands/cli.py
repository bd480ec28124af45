"""The `ihd-node` command: parses arguments and hands each subcommand to the module that owns it.

Subcommand modules are imported only when used, so `ihd-node check-config` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ihd_node import __version__
from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.errors import UserError

CONFIG_HELP = "path of the node's config file (e.g. /etc/ihd-node/config.yaml)"

# subcommand -> "module:function"; each function takes the parsed args and returns an exit code.
HANDLERS = {
    "serve": "ihd_node.commands.serve:serve_command",
    "worker": "ihd_node.commands.worker:worker_command",
    "analyze": "ihd_node.commands.analyze:analyze_command",
    "demo": "ihd_node.commands.demo:demo_command",
    "phantom": "ihd_node.commands.phantom:phantom_command",
    "echo": "ihd_node.commands.echo:echo_command",
    "status": "ihd_node.commands.status:status_command",
    "log": "ihd_node.commands.log:log_command",
    "retry": "ihd_node.commands.retry:retry_command",
    "retract": "ihd_node.commands.retract:retract_command",
    "check-config": "ihd_node.commands.check_config:check_config_command",
    "model": "ihd_node.commands.model:model_command",
    "db": "ihd_node.commands.db:db_command",
    "web-user": "ihd_node.commands.web_user:web_user_command",
    "labels": "ihd_node.commands.labels:labels_command",
    "performance": "ihd_node.commands.performance:performance_command",
    "validation-report": "ihd_node.commands.validation_report:validation_report_command",
    "conformance": "ihd_node.commands.conformance:conformance_command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ihd-node",
        description="DICOM node for a second opinion on intracranial hemorrhage in head CT. NOT FOR DIAGNOSTIC USE.",
    )
    parser.add_argument("--version", action="version", version=f"ihd-node {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM node (receive, analyze, send results)")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--roles", help="PostgreSQL only: run just these roles of a multi-machine node, e.g. "
                   "receive,deliver (analysis then runs in `ihd-node worker` processes)")

    p = sub.add_parser("worker", help="run analysis jobs from the queue of a multi-machine node (PostgreSQL)")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--device", help="torch device for this worker, e.g. cuda:1 (default: model.device)")

    p = sub.add_parser("analyze", help="analyze DICOM files or folders offline")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", default="default", help="checkpoint file (default: the shipped model)")
    p.add_argument("--out", metavar="DIR",
                   help="also write the SR and Grad-CAM secondary captures into this folder (created if needed)")
    p.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM heatmaps")
    p.add_argument("--force", action="store_true",
                   help="also analyse series the node would refuse (too few slices, not a head CT, ...); "
                        "the output marks them FORCED")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU when present)")
    p.add_argument("--explain", choices=["decision", "cnn"], default="decision",
                   help="what the heatmaps explain: the final (BiLSTM) decision or the per-slice CNN")

    p = sub.add_parser("demo", help="end-to-end demo: node + small PACS + two phantom studies")
    p.add_argument("--keep", action="store_true",
                   help="keep the working folder (PACS results, node state, log database) after the demo; "
                        "by default nothing is left behind")

    p = sub.add_parser("phantom", help="write synthetic head-CT series as DICOM")
    p.add_argument("outdir", metavar="OUTDIR", help="folder to write into (one sub-folder per series)")
    p.add_argument("--subtypes", nargs="*", default=None, metavar="SUBTYPE",
                   help=f"hemorrhage subtypes to place: {', '.join(SUBTYPES)}; 'none' for a negative study, "
                        "'any' for a random positive one (default: random)")
    p.add_argument("--slices", type=int, default=None, help="slices per series (default: random 24-36)")
    p.add_argument("--series", type=int, default=1, help="how many series to write (default: 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed and options give the same files (default: 0)")
    p.add_argument("--rsna-layout", action="store_true",
                   help="write the RSNA 2019 layout: one file per slice and stage_2_train.csv")
    p.add_argument("--size", type=int, default=512, help="image rows and columns (default: 512)")
    p.add_argument("--randomize", action="store_true",
                   help="domain randomization as the shipped model's training uses (much wider anatomy, lesions "
                        "and scanner; ihd_node/sim/phantom/wide.py)")

    p = sub.add_parser("echo", help="C-ECHO every configured destination")
    p.add_argument("--config", required=True, help=CONFIG_HELP)

    p = sub.add_parser("status", help="is the node running; what is in flight now; what failed")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="print JSON (every field) instead of text")

    p = sub.add_parser("log", help="recent studies with findings and time to result")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--since", default="24h", help="how far back: a number and s, m, h, d or w, e.g. 30m, 2h, 7d "
                   "(default: 24h)")
    p.add_argument("--json", action="store_true", help="print JSON (every field) instead of text")

    p = sub.add_parser("retry", help="re-send result deliveries that failed or were rejected",
                       description="Put failed and rejected result deliveries (of each series' latest "
                       "analysis) back into the outbox; the running node sends them within a second, "
                       "or the next start does. Nothing is analysed again.")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("series_uid", nargs="?", metavar="SERIES_UID",
                       help="the source SeriesInstanceUID (as `ihd-node status` shows it)")
    which.add_argument("--failed", action="store_true", help="every series with a failed or rejected delivery")

    p = sub.add_parser("labels", help="the radiologist's reads: import a CSV file, list them",
                       description="The truth local performance is measured against: per study and finding, "
                       "present, absent or not assessed, with who read it and when.")
    lsub = p.add_subparsers(dest="labels_command", required=True, metavar="LABELS_COMMAND")
    d = lsub.add_parser("import", help="import reads from a CSV file (all rows or none)",
                        description="Columns: study_instance_uid (or accession_number), finding (one of "
                        f"{', '.join(CLASSES)}), present (1, 0 or not_assessed), optional reader and read_at "
                        "(ISO 8601). Every row is checked; if any is bad, each is reported with its line number "
                        "and nothing is imported (exit status 2). A later read of the same study and finding "
                        "replaces the earlier one; both stay in the history.")
    d.add_argument("file", metavar="FILE.csv", help="the CSV file (UTF-8, comma- or semicolon-separated)")
    d.add_argument("--config", required=True, help=CONFIG_HELP)
    d.add_argument("--max-mb", type=float, default=10.0, help="refuse a file larger than this (default: 10 MB)")
    d.add_argument("--dry-run", action="store_true", help="check every row, import nothing")
    d = lsub.add_parser("list", help="the current reads, or one study's history")
    d.add_argument("--config", required=True, help=CONFIG_HELP)
    d.add_argument("--study", metavar="UID", help="every read of this study (the history), newest first")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("performance", help="local performance: the results against the radiologist's reads",
                       description="Per class: TP/FP/TN/FN, sensitivity, specificity, PPV, NPV (Wilson 95 % "
                       "intervals), AUC (DeLong 95 %) when both classes have 10 reads, calibration per probability "
                       "decile, time to result, results without a read; beside the model card's own figures. "
                       "NOT FOR DIAGNOSTIC USE.")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--since", metavar="WHEN", help="results from this time: 2026-11-01, 2026-11-01T08:00 or a span "
                   "back from now, e.g. 30d (default: all)")
    p.add_argument("--until", metavar="WHEN", help="results before this time; a date includes that whole day "
                   "(default: now)")
    p.add_argument("--json", action="store_true", help="print JSON (every figure, calibration, operating points)")
    p.add_argument("--operating-points", action="store_true",
                   help="a table per class: sensitivity and specificity at each threshold (the current one marked)")
    p.add_argument("--finding", choices=CLASSES, help="only this class")

    p = sub.add_parser("validation-report", help="write the local validation report (self-contained HTML)",
                       description="Cohort, local figures with 95 % intervals beside the model card's, calibration, "
                       "operating points, drift: one HTML file with inline charts, to file before go-live and after. "
                       "NOT FOR DIAGNOSTIC USE.")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    p.add_argument("--since", metavar="WHEN", help="results from this time (as for `performance`; default: all)")
    p.add_argument("--until", metavar="WHEN", help="results before this time (default: now)")
    p.add_argument("--pdf", metavar="FILE.pdf", help="also print it to PDF with headless Chromium")

    p = sub.add_parser("conformance", help="write the DICOM Conformance Statement (PS3.2) for this configuration",
                       description="Generated from the code and the config the node runs with: the presentation "
                       "contexts the receiver accepts and the sender proposes, the objects, templates and codes "
                       "the report stage creates, character sets, security and the IHE integration statement. "
                       "NOT FOR DIAGNOSTIC USE.")
    p.add_argument("--config", help=CONFIG_HELP + "; without it the statement describes the defaults")
    p.add_argument("--out", metavar="FILE.md|FILE.html",
                   help="file to write, format from the suffix (.md or .html); default: Markdown on stdout")

    p = sub.add_parser("retract", help="take a sent result back (rejection note, withdrawn ORU, FHIR "
                       "entered-in-error)",
                       description="Retract the latest result of a series: every DICOM and DICOMweb destination "
                       "gets an IHE IOCM rejection note (KOS, Rejected for Patient Safety Reasons) listing the SR "
                       "and captures, every hl7 destination the ORU with result status W, every fhir destination "
                       "the DiagnosticReport as entered-in-error. The series is then shown as retracted and a "
                       "late instance does not analyse it again (the console's re-analyse does).")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("series_uid", metavar="SERIES_UID", help="the source SeriesInstanceUID (as `ihd-node status` "
                   "shows it)")
    p.add_argument("--reason", required=True, help="why (goes into the notices and the event log)")

    p = sub.add_parser("web-user", help="add or change a web console user and role (basic-auth users file)",
                       description="Asks for the password (or reads one line from stdin when it is not a "
                       "terminal) and writes USER:ROLE:pbkdf2_sha256$... into FILE (created 0600). Roles: viewer "
                       "(pages, metrics), operator (also re-send, re-analyse, retract, reads), admin (also the "
                       "users and configuration page).")
    p.add_argument("file", help="the users file (web.auth.users_file)")
    p.add_argument("user", help="the user name to add, or whose password or role to change")
    p.add_argument("--role", choices=("viewer", "operator", "admin"),
                   help="the user's role (default: the role the user has, viewer for a new user)")

    p = sub.add_parser("check-config", help="validate a config file without starting")
    p.add_argument("file", metavar="FILE", help="path of the config file to check")

    p = sub.add_parser("model", help="model tools")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    d = msub.add_parser("describe", help="the architecture of a preset or checkpoint")
    d.add_argument("name", metavar="PRESET_OR_CHECKPOINT",
                   help="'default' (the shipped model), a preset name or the path of a checkpoint file")
    d.add_argument("--json", action="store_true", help="print JSON (the full provenance) instead of text")

    p = sub.add_parser("db", help="the log database's schema (migrations)")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    d = dsub.add_parser("upgrade", help="create or migrate the schema to this version's newest")
    d.add_argument("--config", required=True, help=CONFIG_HELP)
    d = dsub.add_parser("current", help="which schema revision the database has (exit 1 unless current)")
    d.add_argument("--config", required=True, help=CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"ihd-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
