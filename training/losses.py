"""The training losses: the paper's Eq. 1 and the challenge metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.metrics import CLASS_WEIGHTS
from training.options import TrainingError, TrainOptions


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The challenge metric as a loss: BCE per class weighted 2:1:..:1, divided by the weight sum."""
    w = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (bce * w).sum(dim=-1).mean() / w.sum()


def multi_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 1: BCE summed over the six classes (all weighted 1), averaged over the samples."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return bce.sum(dim=-1).mean()


LOSSES = {"eq1": multi_bce, "weighted": weighted_bce}


def loss_function(opts: TrainOptions):  # -> Callable[[Tensor, Tensor], Tensor]
    if opts.loss not in LOSSES:
        raise TrainingError(f"unknown loss {opts.loss!r}; use {' or '.join(LOSSES)}")
    return LOSSES[opts.loss]
