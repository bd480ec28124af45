"""Per-class probability calibration carried by a checkpoint and applied by the Predictor.

Platt scaling of each class's logit: p = sigmoid(scale * logit + bias), fitted by training on validation
scans (training/calibrate.py) so that a reported 0.8 means "about 80 % of such series have it". A scale
above 0 keeps the order of the scores, so the per-series maximum over slices and the ROC curves stay
the same. Checkpoints written before calibration existed load with the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ihd_node.classes import CLASSES

METHODS = ("identity", "platt")


@dataclass(frozen=True)
class Calibration:
    method: str = "identity"
    scale: tuple[float, ...] = (1.0,) * len(CLASSES)  # CLASSES order
    bias: tuple[float, ...] = (0.0,) * len(CLASSES)
    fitted_on: str = ""  # what the parameters were fitted on, in words

    @property
    def is_identity(self) -> bool:
        return self.method == "identity" or (all(s == 1.0 for s in self.scale) and not any(self.bias))

    def calibrated_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., 6) -> calibrated logits (sigmoid of them are the reported probabilities)."""
        if self.is_identity:
            return logits
        scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        return logits * scale + bias

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities (..., 6) -> calibrated ones (numpy; for evaluation code)."""
        p = np.asarray(probs, dtype=np.float64)
        if self.is_identity:
            return p
        q = np.clip(p, 1e-12, 1.0 - 1e-12)
        z = np.log(q) - np.log1p(-q)
        return 1.0 / (1.0 + np.exp(-(z * np.asarray(self.scale) + np.asarray(self.bias))))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "fitted_on": self.fitted_on,
                "classes": {c: {"scale": float(s), "bias": float(b)}
                            for c, s, b in zip(CLASSES, self.scale, self.bias, strict=True)}}

    @staticmethod
    def from_dict(data: Mapping[str, Any] | None) -> Calibration:
        """The checkpoint's "calibration" entry (absent: identity); ValueError names what is wrong."""
        if not data:
            return Calibration()
        method = str(data.get("method", ""))
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
        classes = data.get("classes") or {}
        if method == "identity":
            return Calibration(fitted_on=str(data.get("fitted_on", "")))
        missing = [c for c in CLASSES if c not in classes]
        if missing:
            raise ValueError(f"calibration missing for {missing}")
        scale = tuple(float(classes[c]["scale"]) for c in CLASSES)
        bias = tuple(float(classes[c]["bias"]) for c in CLASSES)
        if not all(math.isfinite(v) for v in scale + bias) or min(scale) <= 0:
            raise ValueError(f"calibration scales must be finite and > 0, biases finite: {scale} {bias}")
        return Calibration(method, scale, bias, str(data.get("fitted_on", "")))
