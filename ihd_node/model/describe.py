"""`ihd-node model describe PRESET_OR_CHECKPOINT [--json]`: the architecture and its real parameter count;
for a checkpoint also its calibration, thresholds and their policy, and the validation figures it carries
(provenance["validation"]: per generator, per class AUC, sensitivity, specificity, ECE)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ihd_node.errors import UserError
from ihd_node.model.calibration import Calibration
from ihd_node.model.checkpoint import read_checkpoint
from ihd_node.model.input import input_mode
from ihd_node.model.network import IhdModel
from ihd_node.model.presets import PRESETS, ModelConfig

WINDOW_NAMES = ("brain", "subdural", "soft_tissue")


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters per part, counted on an instantiated model (meta device: shapes only, no memory)."""
    try:
        with torch.device("meta"):
            model = IhdModel(config)
    except NotImplementedError:  # some torchvision builders compute at construction time
        model = IhdModel(config)
    parts = {"cnn": model.cnn, "selector": model.selector, "sequence": model.sequence}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["selector_buffers"] = sum(b.numel() for b in model.selector.buffers())
    return counts


def _architecture(name: str, config: ModelConfig) -> dict[str, Any]:
    counts = count_parameters(config)
    return {
        "name": name,
        "backbone": config.backbone,
        "feature_dim": config.feature_dim,
        "selector": {"kind": config.selector, "in_dim": config.feature_dim, "out_dim": config.selected_dim},
        "lstm": {"layers": config.lstm_layers, "hidden_size": config.lstm_hidden,
                 "bidirectional": config.bidirectional, "dropout": config.dropout},
        "concat_cnn_probabilities": config.concat_cnn_probs,
        "classes": list(config.classes),
        "input_size": config.input_size,
        "input": input_mode(config.neighbours),
        "neighbours": config.neighbours,
        "input_channels": config.in_channels,
        "windows": [{"name": n, "center": c, "width": w}
                    for n, (c, w) in zip(WINDOW_NAMES, config.windows, strict=True)],
        "normalization": {"mean": list(config.mean), "std": list(config.std)},
        "parameters": counts["cnn"] + counts["selector"] + counts["sequence"],
        "parameters_by_part": counts,
    }


def describe(preset_or_checkpoint: str) -> dict[str, Any]:
    """Architecture of a preset, or of a checkpoint file ("default" = the shipped model) with its metadata."""
    name = str(preset_or_checkpoint)
    if name in PRESETS:
        return {"source": "preset", **_architecture(name, PRESETS[name])}
    if name != "default" and not Path(name).exists():
        raise UserError(f"{name!r} is neither a model preset nor a checkpoint file; "
                        f"presets: {', '.join(PRESETS)}")
    path, data = read_checkpoint(name)
    try:
        config = ModelConfig.from_dict(data["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"checkpoint {path}: invalid model config ({exc}); re-export it") from None
    return {
        "source": "checkpoint",
        "path": str(path),
        **_architecture(str(data["name"]), config),
        "version": str(data["version"]),
        "created": str(data.get("created", "")),
        "weights_dtype": str(data.get("weights_dtype", "")),
        "thresholds": dict(data["thresholds"]),
        "thresholds_policy": dict(data.get("thresholds_policy") or {}),
        "calibration": _calibration(path, data.get("calibration")),
        "provenance": _redact_paths(dict(data["provenance"])),
    }


def _calibration(path: Path, data: Any) -> dict[str, Any]:
    try:
        return Calibration.from_dict(data).to_dict()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"checkpoint {path}: bad calibration ({exc}); re-export it") from None


def _figure(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def _validation_lines(validation: dict[str, Any]) -> list[str]:
    """Per generator and class: AUC, sensitivity / specificity at the thresholds, ECE (one line each)."""
    lines = []
    for gen, v in validation.items():
        classes = v.get("classes") if isinstance(v, dict) else None
        if not isinstance(classes, dict):
            continue
        lines.append(f"validation  generator {gen}, {v.get('series', '?')} series (AUC / sens / spec / ECE):")
        for c, m in classes.items():
            if isinstance(m, dict):
                lines.append(f"  {c:<18}{_figure(m, 'auc')} / {_figure(m, 'sensitivity')} / "
                             f"{_figure(m, 'specificity')} / {_figure(m, 'ece')}")
    return lines


def _redact_paths(value: Any) -> Any:
    """Absolute paths of the machine that trained the model say nothing about it and leak that machine's
    layout: keep only the last part (issue 7 item 16)."""
    if isinstance(value, dict):
        return {k: _redact_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value)):
        name = (PurePosixPath(value) if value.startswith("/") else PureWindowsPath(value)).name
        return f".../{name}" if name else "..."
    return value


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    """A readable summary of a checkpoint's provenance: data, training, validation figures (the rest: --json)."""
    lines: list[str] = []
    shown: set[str] = set()

    def add(label: str, text: str) -> None:
        lines.append(textwrap.fill(text, 100, initial_indent=f"{label:<12}", subsequent_indent=" " * 12))

    if "data" in prov:
        add("trained on", f"{prov['data']}" + (f" ({prov['date']})" if "date" in prov else ""))
        shown |= {"data", "date"}
    splits = prov.get("splits")
    if isinstance(splits, dict):
        add("splits", ", ".join(f"{k} {v}" for k, v in splits.items()))
        shown.add("splits")
    tr = prov.get("training")
    if isinstance(tr, dict):
        parts = [f"{tr['device']}" if "device" in tr else "", f"seed {tr['seed']}" if "seed" in tr else ""]
        if "cnn_epochs" in tr:
            parts.append(f"CNN {tr['cnn_epochs']} epochs (lr {tr.get('cnn_lr', '?')})")
        if "seq_epochs" in tr:
            parts.append(f"sequence {tr['seq_epochs']} epochs (lr {tr.get('seq_lr', '?')})")
        if "backbone_weights" in tr:
            parts.append(f"backbone start: {tr['backbone_weights'] or 'random init'}")
        add("training", ", ".join(x for x in parts if x))
        shown.add("training")
    if "threshold_method" in prov:
        add("thresholds", f"chosen by {prov['threshold_method']}")
        shown.add("threshold_method")
    if isinstance(prov.get("validation"), dict):
        lines += _validation_lines(prov["validation"])
        shown.add("validation")
    metrics = prov.get("metrics")
    if isinstance(metrics, dict):
        for split, levels in metrics.items():
            if not isinstance(levels, dict):
                continue
            level = "scan" if "scan" in levels else next(iter(levels), None)
            m = levels.get(level) if level else None
            if not isinstance(m, dict) or not isinstance(m.get("classes"), dict):
                continue
            aucs = ", ".join(f"{c} {v['auc']:.3f}" for c, v in m["classes"].items()
                             if isinstance(v, dict) and isinstance(v.get("auc"), (int, float)))
            add("metrics", f"{split.replace('_', ' ')}, {m.get('n', '?')} {level}s: AUC {aucs}")
        shown.add("metrics")
    if "recipe_seconds" in prov:
        add("took", f"{float(prov['recipe_seconds']) / 60:.0f} min to train")
        shown.add("recipe_seconds")
    for key, value in prov.items():  # anything else that is short; long structures only in --json
        if key in shown:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) <= 80:
            add(key.replace("_", " ")[:11], text)
            shown.add(key)
    rest = [k for k in prov if k not in shown]
    if rest:
        add("more", f"{', '.join(rest)}: see --json")
    return lines


def summary_text(d: dict[str, Any]) -> str:
    sel, lstm, size = d["selector"], d["lstm"], d["input_size"]
    concat = "yes" if d["concat_cnn_probabilities"] else "no"
    lines = [
        f"model       {d['name']} ({d['source']}{', ' + d['path'] if 'path' in d else ''})",
        f"cnn         {d['backbone']}, {d['feature_dim']}-d pooled features, input {size}x{size}",
        f"selection   {sel['kind']}: {sel['in_dim']} -> {sel['out_dim']}",
        f"sequence    {'bidirectional ' if lstm['bidirectional'] else ''}LSTM {lstm['layers']} x "
        f"{lstm['hidden_size']}, dropout {lstm['dropout']}, CNN probabilities concatenated: {concat}",
        "windows     " + ", ".join(f"{w['name']} {w['center']:g}/{w['width']:g}" for w in d["windows"]),
        f"input       {d['input']}, {d['input_channels']} channels",
        f"normalise   mean {d['normalization']['mean']}, std {d['normalization']['std']}",
        f"classes     {', '.join(d['classes'])}",
        f"parameters  {d['parameters']:,} ({d['parameters'] / 1e6:.1f} M)",
    ]
    if d["source"] == "checkpoint":
        created = d["created"] or "unknown"
        lines.append(f"version     {d['version']} (created {created}, weights {d['weights_dtype']})")
        lines.append(textwrap.fill(", ".join(f"{k} {v:.3f}" for k, v in d["thresholds"].items()), 100,
                                   initial_indent="thresholds  ", subsequent_indent=" " * 12))
        policy = d.get("thresholds_policy") or {}
        if policy.get("policy") and policy["policy"] != d["provenance"].get("threshold_method"):
            lines.append(textwrap.fill(str(policy["policy"]), 100, initial_indent="policy      ",
                                       subsequent_indent=" " * 12))
        cal = d.get("calibration") or {}
        if cal.get("method") == "platt":
            text = "Platt per class (scale/bias): " + ", ".join(
                f"{c} {p['scale']:.2f}/{p['bias']:+.2f}" for c, p in cal["classes"].items())
            lines.append(textwrap.fill(text, 100, initial_indent="calibration ", subsequent_indent=" " * 12))
        else:
            lines.append("calibration none (the network's own probabilities)")
        lines += _provenance_lines(d["provenance"])
    return "\n".join(lines)
