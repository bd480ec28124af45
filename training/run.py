"""The paper's three training stages, resumable, on a prepared scan cache (see training/data.py).

  1. cnn       fine-tune the CNN on single slices (Adam; lr for 2 epochs, then lr / 5 for 1; augmentation;
               mixed precision on CUDA)
  2. features  extract CNN features and logits of every slice without augmentation; fit the selector on
               up to 30k training vectors (PCA by default)
  3. sequence  train the BiLSTM on whole scans (one scan per batch, Adam 1e-4, 4 epochs), CNN frozen and
               its outputs precomputed; then choose per-class thresholds on the validation split and
               export one checkpoint with ihd_node.model.checkpoint.save_checkpoint.

With `bilstm_features="oof"` (not in the paper; training/stages/oof.py) the features stage also trains K fold
CNNs and writes out-of-fold inputs for the BiLSTM, which then trains in oof/sequence/ and exports
model-oof.pt; the CNN and selector stay the ones above.

Work folder layout: cache/ (scans), splits.json, cnn/state.pt, features/{raw,logits,selected}.npy +
index.json + selector.pt, sequence/state.pt, model.pt (oof/... and model-oof.pt with the option). Each
stage writes `done` into its state; a rerun skips finished stages and continues an unfinished one from
its last saved epoch (or step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from training.data import ScanStore
from training.options import TrainingError, TrainOptions, load_splits
from training.stages.cnn import stage_cnn
from training.stages.export import export_checkpoint
from training.stages.features import stage_features
from training.stages.oof import stage_oof
from training.stages.sequence import BILSTM_FEATURES, stage_sequence

STAGES: tuple[str, ...] = ("cnn", "features", "sequence")


def run_stages(opts: TrainOptions, stages: Sequence[str] = STAGES, out: Path | None = None) -> Path | None:
    """Run the asked stages in order (finished ones are skipped), then export when all are done."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if opts.bilstm_features not in BILSTM_FEATURES:
        raise TrainingError(f"unknown --bilstm-features {opts.bilstm_features!r}; use "
                            f"{' or '.join(BILSTM_FEATURES)}")
    if opts.bilstm_features == "oof" and opts.folds < 2:
        raise TrainingError(f"--folds {opts.folds}: out-of-fold features need at least 2 folds")
    torch.manual_seed(opts.seed)
    store = ScanStore(opts.work / "cache")
    if store.size != opts.config.input_size:
        raise TrainingError(f"the cache holds {store.size}px images but the model wants "
                            f"{opts.config.input_size}px; run prepare again with --input-size "
                            f"{opts.config.input_size}")
    splits = load_splits(opts.work)
    if "cnn" in stages:
        stage_cnn(opts, store, splits)
    if "features" in stages:
        stage_features(opts, store, splits)
        if opts.bilstm_features == "oof":
            stage_oof(opts, store, splits)
    if "sequence" in stages:
        stage_sequence(opts, store, splits)
        return export_checkpoint(opts, store, splits, out)
    return None
