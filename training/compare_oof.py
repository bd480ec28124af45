"""In-sample (the paper) vs out-of-fold BiLSTM measured on the phantom recipe (training/stages/oof.py):

    python -m training.compare_oof --work DIR --scale 0.2 --folds 3 --test-series 60
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ihd_node.model.checkpoint import load_checkpoint
from ihd_node.model.presets import get_preset
from training.metrics import format_metrics, jsonable
from training.options import TrainOptions
from training.phantom_recipe import Recipe, evaluate_held_out, make_training_cache
from training.run import run_stages


def compare_on_phantoms(work: Path, scale: float, folds: int, threads: int, workers: int,
                        test_series: int | None = None) -> dict[str, Any]:
    """In-sample (paper) vs out-of-fold BiLSTM with the phantom recipe's settings, same seed and budget.

    Both runs share the work folder, hence the CNN, its features and the selector; only the BiLSTM's
    training inputs differ. Both checkpoints are scored on held-out phantoms through the node's Predictor.
    """
    torch.set_num_threads(threads)
    recipe = Recipe()
    recipe = replace(recipe, train_series=max(10, int(recipe.train_series * scale)),
                     val_series=max(5, int(recipe.val_series * scale)),
                     test_series=max(10, int(recipe.test_series * scale)),
                     cnn_epoch_size=max(64, int(recipe.cnn_epoch_size * scale)))
    if test_series:
        recipe = replace(recipe, test_series=test_series)
    config = get_preset("compact")
    make_training_cache(work, recipe, config.input_size, workers)
    opts = TrainOptions(
        work=work, config=config, device="cpu", seed=recipe.seed, cnn_epochs=recipe.cnn_epochs,
        cnn_lr=recipe.cnn_lr, lr_scale=recipe.lr_scale, batch_size=recipe.batch_size,
        epoch_size=recipe.cnn_epoch_size, positive_share=recipe.positive_share, augment=recipe.augment,
        mask_weight=recipe.mask_weight, bn_momentum=recipe.bn_momentum, val_every_epoch=False, loss="weighted",
        seq_epochs=recipe.seq_epochs, seq_lr=1e-4 * recipe.seq_lr_scale / recipe.lr_scale, folds=folds)
    result: dict[str, Any] = {"scale": scale, "folds": folds, "recipe": jsonable(recipe.__dict__ | {
        "augment": None})}
    for mode in ("in_sample", "oof"):
        run_opts = replace(opts, bilstm_features=mode)
        t0 = time.monotonic()
        checkpoint = run_stages(run_opts)
        assert checkpoint is not None
        result[f"{mode}_seconds_total"] = round(time.monotonic() - t0, 1)
        metrics = evaluate_held_out(checkpoint, recipe, workers)
        print(f"held-out phantoms, BiLSTM {mode}:\n" + format_metrics(metrics), flush=True)
        result[mode] = jsonable(metrics)
        result[f"{mode}_provenance"] = load_checkpoint(checkpoint).provenance.get("bilstm_features", {})
    cnn_state = torch.load(work / "cnn" / "state.pt", map_location="cpu", weights_only=True)
    result["shipped_cnn_seconds"] = sum(h.get("seconds", 0.0) for h in cnn_state["history"])
    (work / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.compare_oof",
                                     description="in-sample vs out-of-fold BiLSTM on the phantom recipe")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--test-series", type=int,
                        help="held-out phantoms to score both checkpoints on (default: the scaled recipe's)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    compare_on_phantoms(args.work, args.scale, args.folds, args.threads, args.workers, args.test_series)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
