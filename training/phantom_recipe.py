"""Build the shipped default model from nothing: synthetic head CTs -> the three stages -> evaluation on
held-out phantoms from another seed range -> checkpoint + model card.

    python -m training.phantom_recipe --out ihd_node/weights/default.pt     (what `make train-phantom` runs)

Deterministic for a given torch build (fixed seeds, single process for the network); made to finish in
under 20 minutes on a 2-core CPU. See training/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.errors import UserError
from training.augment import AugmentConfig
from training.data import CachedScan, save_manifest, write_cached_scan
from training.metrics import evaluate_scans, format_metrics, jsonable
from training.progress import progress

MODEL_NAME = "ihd-node-phantom-compact"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class Recipe:
    """All numbers of the recipe in one place (the model card prints them)."""

    train_series: int = 420
    val_series: int = 60
    test_series: int = 100
    train_seed: int = 10_000  # series i uses seed train_seed + i
    test_seed: int = 900_000  # held-out series: a seed range training never touches
    train_sizes: tuple[int, ...] = (256, 384, 512)  # image sizes of the training phantoms (cycled)
    test_size: int = 512
    negative_share: float = 0.3  # share of series without hemorrhage
    second_subtype_share: float = 0.3  # share of positive series with two subtypes
    cnn_epochs: int = 3
    cnn_epoch_size: int = 10500  # slices drawn per CNN epoch
    cnn_lr: float = 1e-4
    lr_scale: float = 20.0  # from scratch: 2e-3 then 4e-4 instead of the paper's fine-tuning rates
    batch_size: int = 32
    positive_share: float = 0.6
    mask_weight: float = 1.0  # auxiliary lesion-map loss (phantoms have masks)
    bn_momentum: float = 0.1
    seq_epochs: int = 6  # paper 4; the small LSTM is still improving then and an epoch takes seconds
    seq_lr_scale: float = 10.0
    seed: int = 0
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=1.0))


def series_plan(index: int, seed: int, recipe: Recipe) -> tuple[list[str], int]:
    """(subtypes, size) of training/validation series `index`: balanced over the five subtypes."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < recipe.negative_share:
        subtypes: list[str] = []
    else:
        first = SUBTYPES[index % len(SUBTYPES)]
        subtypes = [first]
        if rng.random() < recipe.second_subtype_share:
            subtypes.append(str(rng.choice([s for s in SUBTYPES if s != first])))
    size = recipe.train_sizes[index % len(recipe.train_sizes)]
    return subtypes, size


def phantom_volume(seed: int, subtypes: Sequence[str], size: int
                   ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """One phantom series as (HU (n, size, size) sorted along the patient axis, labels (n, 6), series uid,
    lesion bitmasks (n, size, size)).

    HU goes through the node's own to_hu, so the rescale and the pixel representation the phantom chose
    are undone exactly as for a real scanner's files.
    """
    from ihd_node.imaging.volume import to_hu
    from ihd_node.sim.phantom import make_series

    series = make_series(seed, subtypes=list(subtypes), size=size)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    hu = np.stack([to_hu(by_uid[uid]) for uid in series.sop_uids_sorted]).astype(np.float32)
    return hu, np.asarray(series.labels, dtype=np.uint8), str(series.series_instance_uid), series.masks


def _make_cached(job: tuple[int, int, list[str], int, str, int]) -> dict[str, Any]:
    index, seed, subtypes, size, cache_dir, input_size = job
    torch.set_num_threads(1)
    hu, labels, uid, masks = phantom_volume(seed, subtypes, size)
    cached = write_cached_scan(Path(cache_dir), uid, uid, hu, [f"{uid}.{i}" for i in range(len(labels))],
                               labels, input_size, masks=masks)
    return {"index": index, "scan": cached.__dict__}


def _held_out(job: tuple[int, list[str], int]) -> tuple[np.ndarray, np.ndarray]:
    seed, subtypes, size = job
    torch.set_num_threads(1)
    hu, labels, _, _ = phantom_volume(seed, subtypes, size)
    return hu, labels


def _pool(fn: Any, jobs: list, workers: int, desc: str) -> Iterator[Any]:
    if workers <= 1:
        yield from progress(map(fn, jobs), total=len(jobs), desc=desc)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from progress(pool.map(fn, jobs), total=len(jobs), desc=desc)


def make_training_cache(work: Path, recipe: Recipe, input_size: int, workers: int) -> dict[str, list[str]]:
    """Phantoms for training and validation, cached at the input size; returns the splits."""
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps({"phantoms": [recipe.train_series, recipe.val_series, recipe.train_seed,
                                     list(recipe.train_sizes), recipe.negative_share,
                                     recipe.second_subtype_share], "input_size": input_size})
    if (work / "splits.json").is_file() and (cache / "recipe.json").is_file() \
            and (cache / "recipe.json").read_text() == stamp:
        print(f"reusing the training phantoms in {cache}", flush=True)
        return json.loads((work / "splits.json").read_text())
    n = recipe.train_series + recipe.val_series
    jobs = []
    for i in range(n):
        subtypes, size = series_plan(i, recipe.train_seed, recipe)
        jobs.append((i, recipe.train_seed + i, subtypes, size, str(cache), input_size))
    results = sorted(_pool(_make_cached, jobs, workers, "training phantoms"), key=lambda r: r["index"])
    scans = [CachedScan(**r["scan"]) for r in results]
    save_manifest(cache, scans, input_size)
    # The validation series are the last ones: each series is one scan, so the cut is grouped by scan.
    val_ids = {s.scan_id for s in scans[recipe.train_series:]}
    splits = {"train": sorted(s.scan_id for s in scans if s.scan_id not in val_ids), "val": sorted(val_ids),
              "test": []}
    (work / "splits.json").write_text(json.dumps(splits))
    (cache / "recipe.json").write_text(stamp)
    return splits


def held_out_plan(recipe: Recipe) -> list[tuple[int, list[str], int]]:
    """Held-out series: every subtype alone and in pairs, plus negatives, from the test seed range."""
    jobs = []
    for i in range(recipe.test_series):
        rng = np.random.default_rng([recipe.test_seed, i])
        if i % 10 < 3:
            subtypes: list[str] = []
        else:
            subtypes = [SUBTYPES[i % len(SUBTYPES)]]
            if rng.random() < 0.3:
                subtypes.append(str(rng.choice([s for s in SUBTYPES if s != subtypes[0]])))
        jobs.append((recipe.test_seed + i, subtypes, recipe.test_size))
    return jobs


def evaluate_held_out(checkpoint: Path, recipe: Recipe, workers: int) -> dict[str, Any]:
    from training.evaluate import predict_volumes

    volumes = list(_pool(_held_out, held_out_plan(recipe), workers, "held-out phantoms"))
    labels, probs = predict_volumes(checkpoint, volumes, device="cpu")
    from ihd_node.model.checkpoint import load_checkpoint

    thresholds = load_checkpoint(checkpoint).thresholds
    return evaluate_scans(labels, probs, thresholds)


def _input_note(neighbours: int) -> str:
    if neighbours == 0:
        return ""  # the paper's single-slice input: the card says nothing more (as for the shipped model)
    return (f"; 2.5D: each slice with {neighbours} neighbour(s) on each side as further channels "
            f"({3 * (2 * neighbours + 1)} in all, not the paper's input)")


def model_card(checkpoint: Path, recipe: Recipe) -> str:
    """MODEL_CARD.md text from the checkpoint (held-out metrics and build time are in its provenance)."""
    from ihd_node.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    cfg = loaded.config
    metrics = loaded.provenance["metrics"]["held_out_phantoms"]
    seconds = float(loaded.provenance.get("recipe_seconds", 0.0))
    params = sum(p.numel() for p in loaded.model.parameters())
    scan, sl = metrics["scan"], metrics["slice"]
    rows = []
    for c in CLASSES:
        m, s = scan["classes"][c], sl["classes"][c]
        rows.append(f"| {c} | {m['auc']:.3f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | "
                    f"{m['accuracy']:.3f} | {m['positives']}/{scan['n']} | {s['auc']:.3f} | "
                    f"{loaded.thresholds[c]:.3f} |")
    val = loaded.provenance.get("metrics", {}).get("validation", {}).get("scan", {})
    lr = recipe.cnn_lr * recipe.lr_scale
    val_loss = val.get("log_loss") if val else None
    val_text = f"{val_loss:.4f}" if isinstance(val_loss, float) else "n/a"
    last_train = recipe.train_seed + recipe.train_series + recipe.val_series - 1
    last_test = recipe.test_seed + recipe.test_series - 1
    return f"""# Model card: {loaded.name} {loaded.version}

**NOT FOR CLINICAL USE.** This model was trained only on synthetic head-CT phantoms made by
`ihd_node/sim/phantom/`. It exists so that ihd-node works out of the box (demo, tests, integration with
a PACS). It has never seen a real patient's CT and says nothing reliable about one. For real use, train
the `paper` preset on the RSNA 2019 data (see `training/README.md`) and point the node at that
checkpoint (`model: {{checkpoint: /path/model.pt}}` in config.yaml).

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
- Thresholds (Youden's J on the {recipe.val_series} validation phantoms, scan level):
  {", ".join(f"{c} {loaded.thresholds[c]:.3f}" for c in CLASSES)}.

## What it was trained on
- {recipe.train_series} training and {recipe.val_series} validation phantom series (seeds
  {recipe.train_seed}..{last_train}), image sizes {", ".join(map(str, recipe.train_sizes))},
  {int(recipe.negative_share * 100)}% without hemorrhage, the others with one subtype (rotating over
  all five) or, in {int(recipe.second_subtype_share * 100)}% of them, two.
- Phantom physics (`ihd_node/sim/phantom/`): skull, scalp, grey/white matter with texture, CSF, acute
  blood of 55-85 HU shaped per subtype; varied head size, position, pose, gantry tilt, noise, blur,
  slice count and spacing, pixel encoding.
- Training from random initialisation (no pretrained weights). CNN: {recipe.cnn_epochs} epochs of
  {recipe.cnn_epoch_size} slices, batch {recipe.batch_size}, Adam {lr:g} then {lr * 0.2:g} for the
  last epoch, {int(recipe.positive_share * 100)}% positive slices spread evenly over the subtypes;
  augmentation: flip, shift, rotation, scale, brightness/contrast, HU gain and offset, HU noise, blur;
  an auxiliary loss (weight {recipe.mask_weight:g}) on 1x1 convolutions over feature maps predicting
  the phantoms' lesion masks (training only, not in the model). PCA fitted on the training features.
  BiLSTM: {recipe.seq_epochs} epochs, one scan per batch, Adam {1e-4 * recipe.seq_lr_scale:g}.

## Metrics on held-out phantoms
{recipe.test_series} series from another seed range ({recipe.test_seed}..{last_test}),
{recipe.test_size}x{recipe.test_size}, analysed through `ihd_node.model.pipeline.Predictor` as the
node does. Weighted multi-label log loss (the challenge metric, `any` weighted 2): scan level
{scan["log_loss"]:.4f}, slice level {sl["log_loss"]:.4f}. Sensitivity, specificity and accuracy at
the thresholds above.

| class | scan ROC AUC | sensitivity | specificity | accuracy | positive scans | slice ROC AUC | threshold |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Validation phantoms (scan level, used to pick the thresholds): weighted log loss {val_text}.

These numbers measure how well the model separates this generator's phantoms; they say nothing about
real CT.

## Grad-CAM
The outputs (secondary captures, SR regions) use **decision Grad-CAM** (`model.explain: decision`, the
default): the final BiLSTM logit of the slice is back-propagated through the sequence model and the PCA
feature selection into the CNN's CAM layer, so the map explains the finding as reported, not the per-slice
CNN. `model.explain: cnn` gives the paper's CNN-only maps. Either way the activations come from the forward
pass that made the prediction, and every map is cut to the slice's intracranial space (skull, scalp and
air never carry heat). The CAM layer is the last block of the CNN's stride-16 stage (a 16x16 grid at
256 px) rather than the final stage, whose 8x8 grid is too coarse for thin bleeds.
`tests/test_default_model.py` checks on held-out phantoms that the map's peak lies on or within one grid
cell of the lesion on most positive slices, and for the decision maps at least as often as for the CNN
maps: decision 129 of 142 slices, CNN 121 of 142 (both masked; 115 of 142 for unmasked CNN maps when this
model was built, 63 of 142 with the final stage).

## How to reproduce
`make train-phantom` (= `python -m training.phantom_recipe --out ihd_node/weights/default.pt`):
{seconds / 60:.1f} minutes for this build on a shared 2-core CPU (phantoms, three stages and the
held-out evaluation). Fixed seeds make the phantoms identical on every run; the weights come out the
same for the same torch build and thread count, up to the nondeterminism of some CPU kernels.
"""


def run_recipe(out: Path, work: Path, recipe: Recipe, workers: int = 2, threads: int = 2,
               verbose: bool = True, neighbours: int = 0) -> dict[str, Any]:
    from ihd_node.model.presets import get_preset
    from training.evaluate import store_provenance
    from training.options import TrainOptions
    from training.run import run_stages

    started = time.monotonic()
    torch.set_num_threads(threads)
    config = get_preset("compact").with_changes(neighbours=neighbours)
    splits = make_training_cache(work, recipe, config.input_size, workers)
    print(f"phantoms ready after {time.monotonic() - started:.0f}s: {len(splits['train'])} train, "
          f"{len(splits['val'])} val scans", flush=True)
    opts = TrainOptions(
        work=work, config=config, device="cpu", seed=recipe.seed, cnn_epochs=recipe.cnn_epochs,
        cnn_lr=recipe.cnn_lr, lr_scale=recipe.lr_scale, batch_size=recipe.batch_size,
        epoch_size=recipe.cnn_epoch_size, positive_share=recipe.positive_share, augment=recipe.augment,
        mask_weight=recipe.mask_weight, bn_momentum=recipe.bn_momentum, val_every_epoch=False, loss="weighted",
        seq_epochs=recipe.seq_epochs, seq_lr=1e-4 * recipe.seq_lr_scale / recipe.lr_scale, name=MODEL_NAME,
        version=MODEL_VERSION, verbose=verbose,
        trained_on=f"synthetic head-CT phantoms (ihd_node.sim.phantom), {recipe.train_series} series, "
                   f"seeds from {recipe.train_seed}",
    )
    checkpoint = run_stages(opts, out=out)
    assert checkpoint is not None
    print(f"training done after {time.monotonic() - started:.0f}s", flush=True)
    metrics = evaluate_held_out(checkpoint, recipe, workers)
    print("held-out phantoms:\n" + format_metrics(metrics), flush=True)
    seconds = time.monotonic() - started
    store_provenance(checkpoint, {"metrics": {"held_out_phantoms": jsonable(metrics)},
                                  "recipe_seconds": round(seconds, 1)})
    (out.parent / "MODEL_CARD.md").write_text(model_card(checkpoint, recipe))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.parent / 'MODEL_CARD.md'} "
          f"in {seconds / 60:.1f} min", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.phantom_recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ihd_node/weights/default.pt"))
    parser.add_argument("--work", type=Path,
                        help="keep intermediate files here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="processes making phantoms (default 2)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="scale the number of phantoms and CNN steps (quick trials: 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (initialisation, sampling, augmentation); the phantoms stay the same")
    parser.add_argument("--neighbours", type=int, default=0,
                        help="2.5D input with this many slices on each side (to measure the option; the "
                             "shipped model is single-slice, 0)")
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite MODEL_CARD.md beside --out from that checkpoint")
    args = parser.parse_args(argv)
    recipe = Recipe(seed=args.seed)
    if args.scale != 1.0:
        recipe = replace(recipe, train_series=max(10, int(recipe.train_series * args.scale)),
                         val_series=max(5, int(recipe.val_series * args.scale)),
                         test_series=max(10, int(recipe.test_series * args.scale)),
                         cnn_epoch_size=max(64, int(recipe.cnn_epoch_size * args.scale)))
    try:
        if args.card_only:
            (args.out.parent / "MODEL_CARD.md").write_text(model_card(args.out, recipe))
            return 0
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            run_recipe(args.out, args.work, recipe, args.workers, args.threads, neighbours=args.neighbours)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="ihd-phantom-recipe-"))
            try:
                run_recipe(args.out, tmp, recipe, args.workers, args.threads, neighbours=args.neighbours)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UserError as exc:
        print(f"phantom recipe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
