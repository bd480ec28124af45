"""Build the shipped default model from nothing: synthetic head CTs -> the three stages -> evaluation on
held-out phantoms from another seed range -> checkpoint + model card.

    python -m training.phantom_recipe --out ihd_node/weights/default.pt     (what `make train-phantom` runs)

Deterministic for a given torch build (fixed seeds, single process for the network); made to finish in
under 20 minutes on a 2-core CPU. See training/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
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

from ihd_node.classes import SUBTYPES
from ihd_node.errors import UserError
from training.augment import AugmentConfig
from training.calibrate import format_figures
from training.data import CachedScan, save_manifest, write_cached_scan
from training.metrics import evaluate_scans, format_metrics, jsonable
from training.model_card import model_card, reliability_svg
from training.progress import progress

MODEL_NAME = "ihd-node-phantom-compact"
MODEL_VERSION = "2.0.0"  # 2: randomized phantoms, calibrated, thresholds by a sensitivity policy


@dataclass(frozen=True)
class Recipe:
    """All numbers of the recipe in one place (the model card prints them)."""

    train_series: int = 480
    val_series: int = 200  # calibration and thresholds: enough series for stable sensitivity figures
    test_series: int = 60
    train_seed: int = 10_000  # series i uses seed train_seed + i
    test_seed: int = 900_000  # held-out series: a seed range training never touches
    crossgen_per_kind: int = 8  # A and B cohorts: 10 negative, 8 per subtype alone, each of the 10 pairs = 60
    crossgen_size: int | None = None  # their image size (None: crossgen's defaults, A 512 and B 256 px)
    train_sizes: tuple[int, ...] = (256, 384, 512)  # image sizes of the training phantoms (cycled)
    test_size: int = 512
    negative_share: float = 0.3  # share of series without hemorrhage
    second_subtype_share: float = 0.3  # share of positive series with two subtypes
    randomize_share: float = 0.85  # share of series with domain randomization (the rest: default phantoms)
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
    # Warm start (optional): the CNN backbone of an earlier checkpoint instead of random initialisation;
    # a shorter fine-tuning at a lower rate then replaces training from scratch.
    warm_start: str | None = None
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=1.0))


def series_plan(index: int, seed: int, recipe: Recipe) -> tuple[list[str], int, bool]:
    """(subtypes, size, randomized) of training/validation series `index`: balanced over the five
    subtypes."""
    rng = np.random.default_rng([seed, index])
    randomize = bool(np.random.default_rng([seed, index, 7]).uniform() < recipe.randomize_share)
    if rng.random() < recipe.negative_share:
        subtypes: list[str] = []
    else:
        first = SUBTYPES[index % len(SUBTYPES)]
        subtypes = [first]
        if rng.random() < recipe.second_subtype_share:
            subtypes.append(str(rng.choice([s for s in SUBTYPES if s != first])))
    size = recipe.train_sizes[index % len(recipe.train_sizes)]
    return subtypes, size, randomize


def phantom_volume(seed: int, subtypes: Sequence[str], size: int, randomize: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """One phantom series as (HU (n, size, size) sorted along the patient axis, labels (n, 6), series uid,
    lesion bitmasks (n, size, size)).

    HU goes through the node's own to_hu, so the rescale and the pixel representation the phantom chose
    are undone exactly as for a real scanner's files.
    """
    from ihd_node.imaging.volume import to_hu
    from ihd_node.sim.phantom import make_series

    series = make_series(seed, subtypes=list(subtypes), size=size, randomize=randomize)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    hu = np.stack([to_hu(by_uid[uid]) for uid in series.sop_uids_sorted]).astype(np.float32)
    return hu, np.asarray(series.labels, dtype=np.uint8), str(series.series_instance_uid), series.masks


def _make_cached(job: tuple[int, int, list[str], int, bool, str, int]) -> dict[str, Any]:
    index, seed, subtypes, size, randomize, cache_dir, input_size = job
    torch.set_num_threads(1)
    hu, labels, uid, masks = phantom_volume(seed, subtypes, size, randomize)
    cached = write_cached_scan(Path(cache_dir), uid, uid, hu, [f"{uid}.{i}" for i in range(len(labels))],
                               labels, input_size, masks=masks)
    return {"index": index, "scan": cached.__dict__}


def _held_out(job: tuple[int, list[str], int, bool]) -> tuple[np.ndarray, np.ndarray]:
    seed, subtypes, size, randomize = job
    torch.set_num_threads(1)
    hu, labels, _, _ = phantom_volume(seed, subtypes, size, randomize)
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
                                     recipe.second_subtype_share, recipe.randomize_share],
                        "input_size": input_size})
    if (work / "splits.json").is_file() and (cache / "recipe.json").is_file() \
            and (cache / "recipe.json").read_text() == stamp:
        print(f"reusing the training phantoms in {cache}", flush=True)
        return json.loads((work / "splits.json").read_text())
    n = recipe.train_series + recipe.val_series
    jobs = []
    for i in range(n):
        subtypes, size, randomize = series_plan(i, recipe.train_seed, recipe)
        jobs.append((i, recipe.train_seed + i, subtypes, size, randomize, str(cache), input_size))
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


def held_out_plan(recipe: Recipe) -> list[tuple[int, list[str], int, bool]]:
    """Held-out series: every subtype alone and in pairs, plus negatives, from the test seed range;
    randomized as the training mix is (the same share)."""
    jobs = []
    for i in range(recipe.test_series):
        rng = np.random.default_rng([recipe.test_seed, i])
        if i % 10 < 3:
            subtypes: list[str] = []
        else:
            subtypes = [SUBTYPES[i % len(SUBTYPES)]]
            if rng.random() < 0.3:
                subtypes.append(str(rng.choice([s for s in SUBTYPES if s != subtypes[0]])))
        randomize = bool(np.random.default_rng([recipe.test_seed, i, 7]).uniform() < recipe.randomize_share)
        jobs.append((recipe.test_seed + i, subtypes, recipe.test_size, randomize))
    return jobs


def evaluate_held_out(checkpoint: Path, recipe: Recipe, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out generator A through the node's Predictor: (the paper's metrics, the card's figures)."""
    from ihd_node.model.checkpoint import load_checkpoint
    from training.calibrate import class_figures
    from training.evaluate import predict_volumes

    volumes = list(_pool(_held_out, held_out_plan(recipe), workers, "held-out phantoms"))
    labels, probs = predict_volumes(checkpoint, volumes, device="cpu")
    thresholds = load_checkpoint(checkpoint).thresholds
    scan_t = np.stack([y.max(axis=0) for y in labels])
    scan_p = np.stack([p.max(axis=0) for p in probs])
    figures = {"description": "generator A (ihd_node.sim.phantom), held-out seeds "
                              f"{recipe.test_seed}..{recipe.test_seed + recipe.test_series - 1}, "
                              f"{int(recipe.randomize_share * 100)}% randomized",
               "series": len(volumes), "classes": class_figures(scan_t, scan_p, thresholds)}
    return evaluate_scans(labels, probs, thresholds), figures


def warm_backbone(checkpoint: Path, work: Path) -> Path:
    """The CNN backbone of a checkpoint as a state_dict file (what TrainOptions.backbone_weights reads)."""
    from ihd_node.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    out = work / "warm_backbone.pt"
    torch.save({k: v.clone() for k, v in loaded.model.cnn.backbone.state_dict().items()}, out)
    return out


def write_card(checkpoint: Path, folder: Path, recipe: Recipe) -> None:
    """MODEL_CARD.md and reliability.svg beside the checkpoint."""
    from ihd_node.model.checkpoint import load_checkpoint

    (folder / "MODEL_CARD.md").write_text(model_card(checkpoint, recipe))
    validation = load_checkpoint(checkpoint).provenance.get("validation") or {}
    if validation:
        (folder / "reliability.svg").write_text(reliability_svg(validation))


def cross_generator(checkpoint: Path, recipe: Recipe, workers: int) -> dict[str, Any]:
    """Figures on a held-out generator-A cohort and on the independent generator B, the same mix of
    negatives, single subtypes and pairs, by `python -m training crossgen` (a subprocess: crossgen reads
    this recipe's seed ranges, so importing it here would close an import circle). B is a pure test: never
    used for training, calibration or thresholds."""
    import subprocess

    descriptions = {"a": "generator A (ihd_node.sim.phantom, default phantoms), held-out seeds",
                    "b": "generator B (ihd_node.sim.generator_b), written independently, never trained on"}
    out = {}
    with tempfile.TemporaryDirectory(prefix="ihd-crossgen-") as tmp:
        for gen in ("a", "b"):
            path = Path(tmp) / f"{gen}.json"
            cmd = [sys.executable, "-m", "training", "crossgen", "--checkpoint", str(checkpoint), "--generator", gen,
                   "--n", str(recipe.crossgen_per_kind), "--workers", str(workers), "--out", str(path)]
            if recipe.crossgen_size:
                cmd += ["--size", str(recipe.crossgen_size)]
            root = str(Path(__file__).resolve().parent.parent)  # this tree's `training` and `ihd_node`
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise UserError(f"cross-generator evaluation on {gen.upper()} failed: {proc.stderr.strip()[-800:]}")
            report = json.loads(path.read_text())
            kinds = report["composition"]
            pairs = sum(v for k, v in kinds.items() if "+" in k)
            single = sum(kinds.values()) - pairs - kinds.get("negative", 0)
            out[gen.upper()] = {
                "description": f"{descriptions[gen]}; {kinds.get('negative', 0)} negative, {single} with one "
                               f"subtype, {pairs} with two",
                "series": report["n_series"], "composition": kinds, "classes": report["classes"],
                "command": f"python -m training crossgen --checkpoint CHECKPOINT --generator {gen} "
                           f"--n {recipe.crossgen_per_kind}"}
    return out


def run_recipe(out: Path, work: Path, recipe: Recipe, workers: int = 2, threads: int = 2,
               verbose: bool = True, neighbours: int = 0, config: Any = None, evaluate: bool = True
               ) -> dict[str, Any]:
    """The whole recipe; `config` replaces the compact preset (tests train a tiny model with it)."""
    from ihd_node.model.presets import get_preset
    from training.evaluate import store_provenance
    from training.options import TrainOptions
    from training.run import run_stages

    started = time.monotonic()
    torch.set_num_threads(threads)
    config = config or get_preset("compact").with_changes(neighbours=neighbours)
    splits = make_training_cache(work, recipe, config.input_size, workers)
    backbone = warm_backbone(Path(recipe.warm_start), work) if recipe.warm_start else None
    print(f"phantoms ready after {time.monotonic() - started:.0f}s: {len(splits['train'])} train, "
          f"{len(splits['val'])} val scans", flush=True)
    opts = TrainOptions(
        work=work, config=config, device="cpu", seed=recipe.seed, cnn_epochs=recipe.cnn_epochs,
        backbone_weights=str(backbone) if backbone else None,
        cnn_lr=recipe.cnn_lr, lr_scale=recipe.lr_scale, batch_size=recipe.batch_size,
        epoch_size=recipe.cnn_epoch_size, positive_share=recipe.positive_share, augment=recipe.augment,
        mask_weight=recipe.mask_weight, bn_momentum=recipe.bn_momentum, val_every_epoch=False, loss="weighted",
        seq_epochs=recipe.seq_epochs, seq_lr=1e-4 * recipe.seq_lr_scale / recipe.lr_scale, name=MODEL_NAME,
        version=MODEL_VERSION, verbose=verbose,
        trained_on=f"synthetic head-CT phantoms (ihd_node.sim.phantom, {int(recipe.randomize_share * 100)}% "
                   f"domain-randomized), {recipe.train_series} series, seeds from {recipe.train_seed}"
                   + (f"; CNN warm-started from {Path(recipe.warm_start).name}" if recipe.warm_start else ""),
    )
    checkpoint = run_stages(opts, out=out)
    assert checkpoint is not None
    print(f"training done after {time.monotonic() - started:.0f}s", flush=True)
    if not evaluate:
        store_provenance(checkpoint, {"recipe_seconds": round(time.monotonic() - started, 1)})
        write_card(checkpoint, out.parent, recipe)
        return {}
    metrics, figures_a = evaluate_held_out(checkpoint, recipe, workers)
    print("held-out phantoms:\n" + format_metrics(metrics), flush=True)
    print("held-out generator A (calibrated):\n" + format_figures(figures_a["classes"]), flush=True)
    validation = cross_generator(checkpoint, recipe, workers)
    for figures in validation.values():
        print(f"{figures['description']}:\n" + format_figures(figures["classes"]), flush=True)
    seconds = time.monotonic() - started
    store_provenance(checkpoint, {"metrics": {"held_out_phantoms": jsonable(metrics),
                                              "held_out_phantoms_figures": jsonable(figures_a)},
                                  "validation": jsonable(validation), "recipe_seconds": round(seconds, 1)})
    write_card(checkpoint, out.parent, recipe)
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
    parser.add_argument("--warm-start", type=Path, metavar="CHECKPOINT",
                        help="start the CNN from this checkpoint's backbone (fine-tuning) instead of random "
                             "initialisation")
    parser.add_argument("--cnn-epochs", type=int, help="override the recipe's CNN epochs")
    parser.add_argument("--epoch-size", type=int, help="override the recipe's slices per CNN epoch")
    parser.add_argument("--lr-scale", type=float, help="override the recipe's learning-rate scale (20)")
    parser.add_argument("--no-eval", action="store_true",
                        help="train (or re-export from --work) and write the card, without the held-out and "
                             "cross-generator evaluations (compare_models --store-into adds them)")
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite MODEL_CARD.md beside --out from that checkpoint")
    args = parser.parse_args(argv)
    recipe = Recipe(seed=args.seed, warm_start=str(args.warm_start) if args.warm_start else None)
    overrides = {"cnn_epochs": args.cnn_epochs, "cnn_epoch_size": args.epoch_size, "lr_scale": args.lr_scale}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if args.scale != 1.0:
        recipe = replace(recipe, train_series=max(10, int(recipe.train_series * args.scale)),
                         val_series=max(5, int(recipe.val_series * args.scale)),
                         test_series=max(10, int(recipe.test_series * args.scale)),
                         cnn_epoch_size=max(64, int(recipe.cnn_epoch_size * args.scale)),
                         crossgen_per_kind=max(1, int(recipe.crossgen_per_kind * args.scale)))
    try:
        if args.card_only:
            write_card(args.out, args.out.parent, recipe)
            return 0
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            run_recipe(args.out, args.work, recipe, args.workers, args.threads, neighbours=args.neighbours,
                       evaluate=not args.no_eval)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="ihd-phantom-recipe-"))
            try:
                run_recipe(args.out, tmp, recipe, args.workers, args.threads, neighbours=args.neighbours,
                           evaluate=not args.no_eval)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UserError as exc:
        print(f"phantom recipe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
