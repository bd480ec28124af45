"""What every training stage shares: the run's options, its error type, the device, the stage states on disk
and the splits (see training/run.py for the stages and the work folder)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ihd_node.errors import UserError
from ihd_node.model.presets import ModelConfig
from training.augment import AugmentConfig


@dataclass
class TrainOptions:
    """Everything a run needs besides the data; stored in each stage's state and the checkpoint."""

    work: Path
    config: ModelConfig
    device: str = "auto"
    seed: int = 0
    backbone_weights: str | None = None  # local pretrained state_dict for the backbone; random init if None
    # Stage 1 (paper: Adam, 1e-4 for 2 epochs then 2e-5 for 1, batch 32).
    cnn_epochs: int = 3
    cnn_lr: float = 1e-4
    cnn_lr_drop_epoch: int = 2  # epochs before this use cnn_lr, later ones cnn_lr * cnn_lr_drop
    cnn_lr_drop: float = 0.2
    lr_scale: float = 1.0  # multiplies both stages' learning rates (e.g. 10 when training from scratch)
    batch_size: int = 32
    epoch_size: int | None = None  # slices drawn per epoch; default: the number of training slices
    positive_share: float = 0.0  # 0 = natural distribution; >0 = that share of positives, even over subtypes
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool = True  # mixed precision, CUDA only
    workers: int = 0  # DataLoader worker processes
    save_every: int = 0  # also save the stage-1 state every N steps (0: at epoch ends only)
    val_every_epoch: bool = True  # CNN metrics on the validation split after every epoch (else the last only)
    weight_decay: float = 0.0
    bn_momentum: float | None = None  # e.g. 0.1 from scratch (MobileNet's default 0.01 lags a short run)
    mask_weight: float = 0.0  # weight of the auxiliary lesion-map loss on data with masks (phantoms)
    loss: str = "eq1"  # "eq1": the paper's Eq. 1 (plain sum over classes); "weighted": the challenge metric
    seq_clip: float = 5.0  # BiLSTM gradient-norm clipping (not in the paper; 0 = off)
    # What the BiLSTM is trained on: "in_sample" (paper) = the shipped CNN's features of its own training
    # slices; "oof" = out-of-fold features of `folds` CNNs trained on the other folds (training/stages/oof.py).
    bilstm_features: str = "in_sample"
    folds: int = 5
    # Stage 2.
    pca_samples: int = 30000
    weight_reading: str = "per_class"  # weight_* selectors: "per_class" (paper) or "summed" over classes
    # Stage 3 (paper: Adam 1e-4, 4 epochs, one scan per batch).
    seq_epochs: int = 4
    seq_lr: float = 1e-4
    seq_batch: int = 1
    # Export: per-class calibration (platt | none) fitted on the validation split, then thresholds on the
    # calibrated scan probabilities: "sensitivity" = the highest keeping target_sensitivity, raised to keep
    # specificity >= min_specificity (or youden/f1).
    calibration: str = "platt"
    threshold_method: str = "sensitivity"
    target_sensitivity: float = 0.95
    min_specificity: float = 0.9  # a floor under the sensitivity policy: at most 10 % false calls on validation
    name: str = "ihd-node"
    version: str = "0.0.0"
    trained_on: str = ""
    verbose: bool = True

    def jsonable(self) -> dict[str, Any]:
        d = asdict(self)
        d["work"] = str(self.work)
        d["config"] = self.config.to_dict()
        return d


class TrainingError(UserError):
    """A training run cannot go on; the message says why and what to do."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TrainingError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def log(opts: TrainOptions, msg: str) -> None:
    if opts.verbose:
        print(msg, flush=True)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: unreadable stage state ({type(exc).__name__}); "
                            "delete it to redo the stage") from None


def load_splits(work: Path) -> dict[str, list[str]]:
    path = work / "splits.json"
    if not path.is_file():
        raise TrainingError(f"{path}: no splits; run `python -m training prepare` first")
    return json.loads(path.read_text())



def check_config(state: dict[str, Any], opts: TrainOptions, stage: str) -> None:
    try:  # through from_dict: states saved before a config field existed read with its default
        same = ModelConfig.from_dict(state.get("config") or {}) == opts.config
    except (TypeError, ValueError, KeyError):
        same = False
    if not same:
        raise TrainingError(f"{opts.work / stage}: was started with another model config; use a new --work "
                            f"folder or delete {opts.work / stage} to restart that stage")
