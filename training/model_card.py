"""MODEL_CARD.md of the shipped default (and its reliability diagrams, reliability.svg) from what the
checkpoint carries: calibration, thresholds and their policy, provenance["validation"] (held-out figures
on generator A and on the independent generator B) and the build time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ihd_node.classes import CLASSES

NOT_SHOWN = """\
- No real patient data: every figure here comes from synthetic phantoms, A (the generator it was trained
  on, held-out seeds) and B (a second generator written independently and never used for training,
  calibration or thresholds). Real CT differs from both more than they differ from each other (scanner
  physics, anatomy, pathology that mimics blood, post-operative heads, children). Nothing here estimates
  performance on real scans. **Not for diagnostic use.**
- Intervals are Wilson 95 % intervals of the series counts behind each figure; with a few dozen series
  per class they are wide, and a figure of 1.000 means "no error seen", not "no error".
- The validation figures (thresholds, calibration) are in-sample for the validation series; only the
  held-out A and the B columns are out-of-sample."""


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    value = _f(m.get(key))
    return value if not ci else f"{value} ({ci[0]:.2f}-{ci[1]:.2f})"


def figures_table(validation: dict[str, dict[str, Any]]) -> str:
    """One row per class, A and B side by side."""
    gens = [g for g in ("A", "B") if g in validation]
    head = "| class | " + " | ".join(
        f"{g} AUC | {g} sensitivity (95 % CI) | {g} specificity (95 % CI) | {g} called when absent | {g} ECE"
        for g in gens) + " |"
    rule = "|---|" + "---|" * (5 * len(gens))
    rows = []
    for c in CLASSES:
        cells = []
        for g in gens:
            m = validation[g]["classes"][c]
            cells += [_f(m.get("auc")), _ci(m, "sensitivity"), _ci(m, "specificity"),
                      _f(m.get("called_when_absent")), _f(m.get("ece"))]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def reliability_svg(validation: dict[str, dict[str, Any]]) -> str:
    """Reliability diagrams (observed share vs mean calibrated probability per bin), one panel per class,
    A in blue, B in orange; marker area ~ series in the bin. Plain SVG, no plotting library."""
    w, h, pad, cols = 180, 180, 30, 3
    rows = (len(CLASSES) + cols - 1) // cols
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * (w + pad) + pad}" '
           f'height="{rows * (h + pad + 14) + pad}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    colours = {"A": "#1f77b4", "B": "#ff7f0e"}
    for i, c in enumerate(CLASSES):
        x0, y0 = pad + (i % cols) * (w + pad), pad + 14 + (i // cols) * (h + pad + 14)
        eces = ", ".join(f"{g} ECE {_f(v['classes'][c].get('ece'))}" for g, v in validation.items())
        out.append(f'<text x="{x0}" y="{y0 - 4}">{c} ({eces})</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
        out.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0}" stroke="#bbb" stroke-dasharray="3,3"/>')
        for g, v in validation.items():
            bins = [b for b in v["classes"][c].get("reliability") or []
                    if b.get("n", b.get("count")) and b.get("mean_probability") is not None
                    and b.get("observed") is not None]
            pts = [(x0 + b["mean_probability"] * w, y0 + h - b["observed"] * h, b.get("n", b.get("count", 1)))
                   for b in bins]
            if len(pts) > 1:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colours.get(g, "#000")}"/>')
            for x, y, n in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{min(2 + n ** 0.5 / 2, 8):.1f}" '
                           f'fill="{colours.get(g, "#000")}" fill-opacity="0.6"/>')
    out.append(f'<text x="{pad}" y="{rows * (h + pad + 14) + pad - 6}">x: mean calibrated probability in the bin, '
               'y: share of series with the class; blue A (held out), orange B; dashed: perfect calibration</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def calibration_lines(data: dict[str, Any]) -> str:
    cal = data.get("classes") or {}
    if data.get("method") != "platt":
        return "- none (identity): the probabilities are the network's own."
    rows = [f"- Platt scaling per class, fitted on {data.get('fitted_on', 'the validation series')}: "
            "p = sigmoid(scale x logit + bias), applied by the node to every slice and series probability "
            "(order-preserving, so ROC AUCs are unchanged).", "",
            "| class | scale | bias |", "|---|---|---|"]
    rows += [f"| {c} | {cal[c]['scale']:.3f} | {cal[c]['bias']:.3f} |" for c in CLASSES]
    return "\n".join(rows)


def threshold_lines(thresholds: dict[str, float], policy: dict[str, Any]) -> str:
    val = policy.get("validation") or {}
    rows = [f"Policy: {policy.get('policy', 'not recorded')} ({policy.get('validation_scans', '?')} validation "
            "series from generator A, seeds disjoint from training and from the held-out A set).", "",
            "| class | threshold | validation sensitivity (95 % CI) | validation specificity (95 % CI) |",
            "|---|---|---|---|"]
    for c in CLASSES:
        m = val.get(c, {})
        rows.append(f"| {c} | {thresholds[c]:.3f} | {_ci(m, 'sensitivity')} | {_ci(m, 'specificity')} |")
    return "\n".join(rows)


def _input_note(neighbours: int) -> str:
    if neighbours == 0:
        return ""  # the paper's single-slice input: the card says nothing more (as for the shipped model)
    return (f"; 2.5D: each slice with {neighbours} neighbour(s) on each side as further channels "
            f"({3 * (2 * neighbours + 1)} in all, not the paper's input)")


def _start_text(recipe: Any) -> str:
    if getattr(recipe, "warm_start", None):
        return (f"The CNN backbone warm-started from {Path(recipe.warm_start).name} (the previous shipped model, "
                "trained on default phantoms only), then fine-tuned; no ImageNet weights.")
    return "Training from random initialisation (no pretrained weights)."


def _drop_text(recipe: Any, lr: float) -> str:
    return f" then {lr * 0.2:g} from epoch 3" if recipe.cnn_epochs > 2 else ""


def _build_text(prov: dict[str, Any], seconds: float) -> str:
    if prov.get("build"):
        return (f"This model was built differently, to fit the time available: {prov['build']}. Training "
                f"took {seconds / 60:.1f} minutes in all.")
    return (f"This build took {seconds / 60:.1f} minutes on a shared 2-core CPU (phantoms, three stages, "
            "calibration, thresholds and the held-out evaluations on A and B).")


def _randomized_line(prov: dict[str, Any]) -> str:
    figures = (prov.get("metrics") or {}).get("held_out_phantoms_figures") or {}
    classes = figures.get("classes") or {}
    if not classes:
        return ""
    aucs = ", ".join(f"{c} {_f(m.get('auc'))}" for c, m in classes.items())
    return f" Scan-level AUC there: {aucs}."


def previous_table(prov: dict[str, Any]) -> str:
    """Before/after on the same cohorts, when the build stored the previous model's figures."""
    prev = prov.get("previous_model") or {}
    now = prov.get("validation") or {}
    rows = []
    for gen in ("A", "B"):
        if gen not in prev.get("validation", {}) or gen not in now:
            continue
        for c in CLASSES:
            a, b = prev["validation"][gen]["classes"][c], now[gen]["classes"][c]
            rows.append(f"| {gen} | {c} | {_f(a.get('auc'))} -> {_f(b.get('auc'))} | "
                        f"{_f(a.get('sensitivity'))} -> {_f(b.get('sensitivity'))} | "
                        f"{_f(a.get('specificity'))} -> {_f(b.get('specificity'))} | "
                        f"{_f(a.get('called_when_absent'))} -> {_f(b.get('called_when_absent'))} | "
                        f"{_f(a.get('ece'))} -> {_f(b.get('ece'))} |")
    if not rows:
        return ""
    return (f"\n\n### Before and after: {prev.get('name', 'the previous model')} -> this model, same series\n"
            "Each at its own thresholds and calibration (the previous model: Youden thresholds, no calibration).\n\n"
            "| generator | class | AUC | sensitivity | specificity | called when absent | ECE |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def goal_text(prov: dict[str, Any]) -> str:
    """Issue 21's bar on generator B, and whether this model clears it."""
    b = (prov.get("validation") or {}).get("B")
    if not b:
        return ""
    m = b["classes"]
    sub = [c for c in CLASSES if c != "any"]
    misses = []
    if (m["any"].get("auc") or 0) < 0.99:
        misses.append(f"AUC any {_f(m['any'].get('auc'))} < 0.99")
    misses += [f"AUC {c} {_f(m[c].get('auc'))} < 0.95" for c in sub if (m[c].get("auc") or 0) < 0.95]
    misses += [f"{c} called on {_f(m[c].get('called_when_absent'))} of B series without it (>= 0.10)"
               for c in sub if (m[c].get("called_when_absent") or 0) >= 0.10]
    if not misses:
        return ("\n\n**Goal on B met**: AUC any >= 0.99, each subtype >= 0.95, each called on < 10 % of the "
                "series without it.")
    return ("\n\n**Goal on B not met** (AUC any >= 0.99, each subtype >= 0.95, each subtype called on < 10 % of "
            "the B series without it): " + "; ".join(misses) + ".")


def model_card(checkpoint: Path, recipe: Any) -> str:
    """MODEL_CARD.md text from the checkpoint (figures and build time are in its provenance); `recipe` is
    the phantom recipe's Recipe."""
    from ihd_node.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    cfg, prov = loaded.config, loaded.provenance
    validation = prov.get("validation") or {}
    seconds = float(prov.get("recipe_seconds", 0.0))
    params = sum(p.numel() for p in loaded.model.parameters())
    lr = recipe.cnn_lr * recipe.lr_scale
    last_train = recipe.train_seed + recipe.train_series + recipe.val_series - 1
    last_test = recipe.test_seed + recipe.test_series - 1
    gens = "\n".join(f"- **{g}**: {v.get('description', '')} ({v.get('series', '?')} series)"
                     for g, v in validation.items())
    b_note = "" if "B" in validation else ("\n\nGenerator B was not available when this card was written: "
                                           "only generator A's figures are shown.")
    return f"""# Model card: {loaded.name} {loaded.version}

**NOT FOR CLINICAL USE. Not for diagnostic use.** This model was trained only on synthetic head-CT
phantoms made by `ihd_node/sim/phantom/`. It exists so that ihd-node works out of the box (demo, tests,
integration with a PACS). It has never seen a real patient's CT and says nothing reliable about one. For
real use, train the `paper` preset on the RSNA 2019 data (see `training/README.md`) and point the node at
that checkpoint (`model: {{checkpoint: /path/model.pt}}` in config.yaml).

## What it is
- Architecture (`compact` preset): {cfg.backbone} CNN per slice ({cfg.feature_dim}-d pooled features,
  6-way head), {cfg.selector.upper()} to {cfg.selected_dim} features, {cfg.lstm_layers}-layer
  {"bidirectional " if cfg.bidirectional else ""}LSTM with {cfg.lstm_hidden} hidden units
  (dropout {cfg.dropout}), the CNN's 6 probabilities concatenated before the final linear layer; scan
  probability = max over slices.
- Input: three windows (brain 40/80, subdural 80/200, soft tissue 40/380), bilinear resize to
  {cfg.input_size}x{cfg.input_size}, the paper's mean/std{_input_note(cfg.neighbours)}.
- {params / 1e6:.2f} M parameters, stored as float16 ({checkpoint.stat().st_size / 1e6:.1f} MB).
- Classes: {", ".join(CLASSES)}.

## Figures: held-out generator A and independent generator B, side by side
Scan level, calibrated probabilities, at the thresholds below; analysed through
`ihd_node.model.pipeline.Predictor` as the node does. "Called when absent" = share of the series without
the class on which it is called (1 - specificity). ECE: expected calibration error, 10 equal-width bins.

{gens}

{figures_table(validation) if validation else "(no figures recorded)"}{b_note}{goal_text(prov)}{previous_table(prov)}

Reliability diagrams: [`reliability.svg`](reliability.svg) (one panel per class, A and B).

## What these figures do not show
{NOT_SHOWN}

## Calibration
{calibration_lines(loaded.calibration.to_dict())}

## Thresholds
{threshold_lines(loaded.thresholds, loaded.thresholds_policy)}

Generator B was used neither for training nor for calibration or thresholds: its column is a pure test.

## What it was trained on
- {recipe.train_series} training and {recipe.val_series} validation phantom series (seeds
  {recipe.train_seed}..{last_train}), image sizes {", ".join(map(str, recipe.train_sizes))},
  {int(recipe.negative_share * 100)}% without hemorrhage, the others with one subtype (rotating over
  all five) or, in {int(recipe.second_subtype_share * 100)}% of them, two.
- Domain randomization (`ihd_node/sim/phantom/wide.py`, `lesions_wide.py`) on
  {int(recipe.randomize_share * 100)}% of the series (the rest are the default phantoms the demo and the
  tests use): head size 50-88 mm half-width and shape, skull thickness x0.6-1.6, ventricles x0.45-2.6
  with left/right asymmetry, brain density offset +-5 HU; blood 30-90 HU (mostly 55-90) with fine
  texture; intraparenchymal clots 7-50 mm of 1-3 irregular lobes anywhere in the parenchyma, often
  against a ventricle wall; intraventricular blood layering in any part of the ventricles, casts and
  partial casts of 1-4 parts; slice spacing 2.5-7.5 mm, gantry tilt up to 30 degrees, noise 1.5-16 HU
  with smooth or sharp kernels, blur, partial volume, beam-hardening cupping and streaks, motion ghosts.
- {_start_text(recipe)} CNN: {recipe.cnn_epochs} epochs of
  {recipe.cnn_epoch_size} slices, batch {recipe.batch_size}, Adam {lr:g}{_drop_text(recipe, lr)},
  {int(recipe.positive_share * 100)}% positive slices spread evenly over the subtypes;
  augmentation: flip, shift, rotation, scale, brightness/contrast, HU gain and offset, HU noise, blur;
  an auxiliary loss (weight {recipe.mask_weight:g}) on 1x1 convolutions over feature maps predicting
  the phantoms' lesion masks (training only, not in the model). PCA fitted on the training features.
  BiLSTM: {recipe.seq_epochs} epochs, one scan per batch, Adam {1e-4 * recipe.seq_lr_scale:g}.
- Also evaluated (the paper's metrics in `provenance["metrics"]["held_out_phantoms"]`, figures in
  `held_out_phantoms_figures`): {recipe.test_series} held-out A series from another seed range
  ({recipe.test_seed}..{last_test}), {recipe.test_size}x{recipe.test_size}, randomized in the same share
  as training.{_randomized_line(prov)}

## Grad-CAM
The outputs (secondary captures, SR regions) use **decision Grad-CAM** (`model.explain: decision`, the
default): the final BiLSTM logit of the slice is back-propagated through the sequence model and the PCA
feature selection into the CNN's CAM layer, so the map explains the finding as reported, not the per-slice
CNN. `model.explain: cnn` gives the paper's CNN-only maps. Either way the activations come from the forward
pass that made the prediction, and every map is cut to the slice's intracranial space (skull, scalp and
air never carry heat). The CAM layer is the last block of the CNN's stride-16 stage (a 16x16 grid at
256 px). `tests/test_default_model.py` checks on held-out phantoms that the map's peak lies on or within
one grid cell of the lesion on most positive slices.

## How to reproduce
`make train-phantom` (= `python -m training.phantom_recipe --out ihd_node/weights/default.pt`) builds a
model from nothing (random initialisation, 3 CNN epochs). {_build_text(prov, seconds)}
Fixed seeds make the phantoms identical on every run;
the weights come out the same for the same torch build and thread count, up to the nondeterminism of
some CPU kernels.
"""
