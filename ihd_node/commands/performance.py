"""`ihd-node performance`: the node's results against the radiologist's reads, per class, for a period.

Every figure goes with its 95 % interval; a class with few reads says so beside the figure (never hides it).
`--operating-points` shows what each threshold would have given; nothing here changes a threshold.
It only reads the log database (and the checkpoint's model card); an admin may run it while the node serves.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from ihd_node.classes import CLASSES, FINDING_NAMES
from ihd_node.commands.log import parse_since
from ihd_node.commands.readout import fit, open_existing, plural, text_table
from ihd_node.config import load_config
from ihd_node.errors import UserError
from ihd_node.monitoring import AUC_MIN_CASES, MIN_READS, ClassPerformance, PerformanceReport, local_performance
from ihd_node.monitoring.performance import MAX_INTERVAL_WIDTH
from ihd_node.store import utcnow

_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_when(text: str, *, end: bool = False, now: datetime | None = None) -> datetime:
    """`2026-11-01` (a whole day: as --until, up to the end of that day), `2026-11-01T08:00`, with or without a
    zone (none: the machine's local time), or a span back from now: `30d`, `12w`, `24h`."""
    text = (text or "").strip()
    if re.fullmatch(r"\d+(?:\.\d+)?\s*[smhdw]", text):
        return (now or utcnow()) - parse_since(text)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date: write e.g. 2026-11-01, 2026-11-01T08:00 or 30d") from None
    if end and _DATE_ONLY.fullmatch(text):
        value += timedelta(days=1)
    return (value.astimezone() if value.tzinfo is None else value).astimezone(UTC)


def model_card(config_path: str) -> dict[str, Any] | None:
    """The configured checkpoint's metadata (its model card figures), or None when it cannot be read."""
    try:
        from ihd_node.model.checkpoint import read_checkpoint

        _, data = read_checkpoint(load_config(config_path).model.checkpoint_path)
    except (UserError, OSError, ImportError):
        return None
    data.pop("state_dict", None)
    return data


def performance_command(args: Any) -> int:
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until, end=True) if args.until else None
    if since and until and since >= until:
        raise UserError(f"--since {args.since} is not before --until {args.until}; swap them")
    if args.finding and args.finding not in CLASSES:
        raise UserError(f"--finding {args.finding}: one of {', '.join(CLASSES)}")
    db = open_existing(args.config)
    try:
        report = local_performance(db, since=since, until=until, model_card=model_card(args.config))
    finally:
        db.close()
    if args.json:
        data = report.to_json()
        if args.finding:
            data["classes"] = {args.finding: data["classes"][args.finding]}
        print(json.dumps(data, indent=2))
    elif args.operating_points:
        print(format_operating_points(report, args.finding))
    else:
        print(format_report(report, args.finding))
    return 0


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def figure(value: float | None, ci: tuple[float, float] | None) -> str:
    """`0.91 (0.80-0.96)`: never a figure without its interval; `-` when there is nothing to divide by."""
    if value is None:
        return "- (no cases)"
    return f"{value:.2f} ({num(ci[0] if ci else None)}-{num(ci[1] if ci else None)})"


def _few(n: int, what: str, ci: tuple[float, float] | None) -> str:
    if n < MIN_READS:
        return f"FEW READS: {n} {what}"
    if ci is not None and ci[1] - ci[0] > MAX_INTERVAL_WIDTH:
        return f"FEW READS: interval {ci[1] - ci[0]:.2f} wide"
    return ""


def _card(p: ClassPerformance, key: str) -> str:
    value = (p.card or {}).get(key)
    return "" if value is None else f"model card {value:.3f}"


def format_class(p: ClassPerformance) -> list[str]:
    thr = "-" if p.threshold is None else f"{p.threshold:.3f}"
    if len(p.thresholds_used) > 1:
        thr += f" (results used {', '.join(f'{t:.3f}' for t in p.thresholds_used)})"
    lines = [f"{p.finding} ({FINDING_NAMES[p.finding]}), threshold {thr}",
             f"  {p.n_read} read ({p.n_present} present, {p.n_absent} absent); {p.n_not_assessed} not assessed, "
             f"{p.n_unread} without a read",
             f"  TP {p.tp}  FP {p.fp}  TN {p.tn}  FN {p.fn}"
             + ("  (any is also called whenever a subtype is)" if p.finding == CLASSES[0] else "")]
    rows = [
        ["sensitivity", figure(p.sensitivity, p.sensitivity_ci), _card(p, "sensitivity"),
         _few(p.n_present, "present", p.sensitivity_ci)],
        ["specificity", figure(p.specificity, p.specificity_ci), _card(p, "specificity"),
         _few(p.n_absent, "absent", p.specificity_ci)],
        ["PPV", figure(p.ppv, p.ppv_ci), _card(p, "ppv"), _few(p.tp + p.fp, "positive calls", p.ppv_ci)],
        ["NPV", figure(p.npv, p.npv_ci), _card(p, "npv"), _few(p.tn + p.fn, "negative calls", p.npv_ci)],
        ["AUC", figure(p.auc, p.auc_ci) if p.auc is not None else
         f"- (needs at least {AUC_MIN_CASES} present and {AUC_MIN_CASES} absent reads)", _card(p, "auc"), ""],
    ]
    lines += ["  " + line for line in text_table(["figure", "value (95% CI)", "model card", ""], rows)]
    if p.few_reads:
        lines.append(fit(f"  Few reads: {p.few_reads_reason}.", "    "))
    filled = [b for b in p.calibration if b.n]
    if filled:
        lines.append("  calibration (predicted decile: mean predicted -> observed rate (95% CI), n):")
        lines += [f"    {b.low:.1f}-{b.high:.1f}: {num(b.mean_predicted)} -> {figure(b.observed_rate, b.observed_ci)}, "
                  f"n {b.n}" for b in filled]
    return lines



def format_report(report: PerformanceReport, finding: str | None = None) -> str:
    period = f"{_day(report.since) or 'the first result'} to {_day(report.until) or 'now'}"
    lines = [f"Local performance, results from {period}: {plural(report.n_results, 'study', 'studies')} with a "
             f"result, {report.n_read_studies} of them with a read. NOT FOR DIAGNOSTIC USE.",
             f"Model: {', '.join(report.models) or '-'}; intervals: Wilson 95% (AUC: DeLong 95%); a call is "
             "positive at the threshold the analysis used.",
             f"Shown against: {report.card_source or 'no model card figures in the checkpoint'}."]
    t = report.time_to_result
    if t.get("n"):
        lines.append("Time to result (first image received -> results delivered): "
                     f"median {num(t['p50_seconds'], 1)} s, 90th percentile {num(t['p90_seconds'], 1)} s, "
                     f"{t['n']} results.")
    lines = [fit(line, "  ") for line in lines]
    for c in ([finding] if finding else CLASSES):
        lines += [""] + format_class(report.classes[c])
    return "\n".join(lines)


def _day(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="minutes").replace("+00:00", " UTC")


def format_operating_points(report: PerformanceReport, finding: str | None = None) -> str:
    lines = [fit("Operating points on the local reads: what each threshold would have given (score >= threshold "
                 "is positive). * = the threshold in use. Nothing is changed: set analysis.thresholds yourself.", "")]
    for c in ([finding] if finding else CLASSES):
        p = report.classes[c]
        lines += ["", fit(f"{c}: {p.n_read} read ({p.n_present} present, {p.n_absent} absent)"
                          + (f"; FEW READS: {p.few_reads_reason}" if p.few_reads else ""), "  ")]
        if not p.operating_points:
            lines.append("  no reads yet")
            continue
        rows = [[("* " if op.current else "  ") + f"{op.threshold:.6g}", num(op.sensitivity, 3), num(op.specificity, 3),
                 op.tp, op.fp, op.tn, op.fn] for op in reversed(p.operating_points)]
        headers = ["threshold", "sensitivity", "specificity", "TP", "FP", "TN", "FN"]
        lines += ["  " + line for line in text_table(headers, rows)]
    return "\n".join(lines)
