"""HU volume in, Prediction out: preprocessing, batched CNN, selector + BiLSTM, Grad-CAM on positives.

Grad-CAM explains the decision by default (`explain="decision"`): the final BiLSTM logit of a slice is
back-propagated through the sequence model and the feature selection (PCA is linear) into the CNN's CAM
layer. `explain="cnn"` gives the paper's maps of the per-slice CNN. Either way the CAM layer's activations
come from the one forward pass that made the prediction (no second CNN run), and every map is kept
inside the slice's intracranial space.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.imaging.intracranial import intracranial_mask
from ihd_node.model.calibration import Calibration
from ihd_node.model.checkpoint import load_checkpoint
from ihd_node.model.gradcam import EXPLAIN_MODES, cams_from_activations, frozen, mask_heatmap
from ihd_node.model.input import stack_neighbours
from ihd_node.model.network import IhdModel
from ihd_node.model.optimize import fuse_conv_bn
from ihd_node.model.preprocess import prepare_slices
from ihd_node.values.prediction import ModelIdentity, Prediction, positive_mask

log = logging.getLogger("ihd_node.model")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not valid; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is available here; use cpu or auto")
    return dev


class Predictor:
    """A loaded model ready to analyse series; safe to share between threads (calls are serialised)."""

    def __init__(self, model: IhdModel, thresholds: dict[str, float], name: str, version: str, *,
                 trained_on: str = "", device: str | torch.device = "cpu", batch_size: int = 16,
                 explain: str = "decision", optimize: bool = True, calibration: Calibration | None = None) -> None:
        if explain not in EXPLAIN_MODES:
            raise UserError(f"explain {explain!r} is not known; use one of {', '.join(EXPLAIN_MODES)}")
        self.explain = explain  # what the heatmaps explain: the final decision or the per-slice CNN
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        # channels_last convolutions are 20-40 % faster on the CPU (oneDNN) and suit GPUs too.
        self.model.cnn.to(memory_format=torch.channels_last)
        self.config = model.config
        self.thresholds = {c: float(thresholds.get(c, 0.5)) for c in CLASSES}
        self.name = name
        self.version = version
        self.trained_on = trained_on
        self.batch_size = batch_size  # slices per CNN pass: bounds memory for long series
        # Per-class calibration from the checkpoint: every probability reported (and compared with the
        # thresholds, which were chosen on calibrated probabilities) is calibrated.
        self.calibration = calibration or Calibration()
        self._lock = threading.Lock()  # Grad-CAM toggles requires_grad and hooks on the shared model
        # Without heatmaps the forward pass runs on a copy with batch norm folded into the convolutions: the
        # same results within float rounding (<1e-7 here), 1.4-1.8x faster on the CPU (bench_model_cpu.py).
        # With heatmaps it runs on the original: Grad-CAM hooks its CAM layer, which the copy does not have.
        self._cnn_forward: torch.nn.Module = self.model.cnn
        if optimize:
            try:
                self._cnn_forward = fuse_conv_bn(self.model.cnn).to(memory_format=torch.channels_last)
            except Exception as exc:  # a backbone torch.fx cannot trace: the original is just slower
                log.warning("model.not_optimized backbone=%s error=%s", self.config.backbone,
                            f"{type(exc).__name__}: {exc}")

    @classmethod
    def load(cls, checkpoint: str | Path = "default", device: str | torch.device = "auto",
             explain: str = "decision") -> Predictor:
        loaded = load_checkpoint(checkpoint)
        return cls(loaded.model, loaded.thresholds, loaded.name, loaded.version,
                   trained_on=str(loaded.provenance.get("data", "")), device=device, explain=explain,
                   calibration=loaded.calibration)

    @classmethod
    def from_model(cls, model: IhdModel, thresholds: dict[str, float], name: str, version: str,
                   device: str | torch.device = "cpu", explain: str = "decision",
                   calibration: Calibration | None = None) -> Predictor:
        return cls(model, thresholds, name, version, device=device, explain=explain, calibration=calibration)

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name=self.name, version=self.version, thresholds=dict(self.thresholds),
                             trained_on=self.trained_on)

    def predict(self, hu: np.ndarray, explain: bool = True, max_cam_slices: int | None = None, *,
                pixel_spacing_mm: float = 0.5) -> Prediction:
        """Probabilities per slice and per series for HU slices (n, rows, cols) in spatial order.

        Heatmaps are computed for the (slice, class) pairs judged positive (subtypes and `any`); with
        max_cam_slices, only for that many slices, those with the highest positive probability first.
        """
        start = time.perf_counter()
        hu = np.asarray(hu, dtype=np.float32)
        if hu.ndim != 3 or hu.shape[0] == 0:
            raise UserError(f"expected a stack of CT slices (n, rows, cols), got shape {hu.shape}")
        if not np.isfinite(hu).all():
            raise UserError("the HU array contains NaN or infinite values; the slices were not decoded right")
        cfg = self.config
        with self._lock:
            x = prepare_slices(hu, cfg.input_size, self.device, windows=cfg.windows, mean=cfg.mean,
                               std=cfg.std).contiguous(memory_format=torch.channels_last)
            if explain:
                probs, heatmaps = self._predict_explained(x, hu, max_cam_slices, pixel_spacing_mm)
            else:
                with torch.inference_mode():
                    cnn_logits, features = self._cnn(x, self._cnn_forward)
                    logits = self.model.sequence_logits(features.unsqueeze(0), cnn_logits.unsqueeze(0))[0]
                    probs = torch.sigmoid(self.calibration.calibrated_logits(logits)).cpu().numpy()
                    probs = probs.astype(np.float64)
                heatmaps = {}
        return Prediction(slice_probabilities=probs, series_probabilities=probs.max(axis=0),
                          model=self.identity, heatmaps=heatmaps, seconds=time.perf_counter() - start,
                          explained=self.explain if explain else "")

    def _cnn(self, x: torch.Tensor, cnn: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The CNN (default: the model's own, with its CAM layer) over all slices in batches of batch_size
        (bounded memory): (logits (n, 6), features). x holds each slice's three windows (n, 3, S, S)."""
        cnn = cnn or self.model.cnn
        k = self.config.neighbours
        # 2.5D: each batch's inputs are stacked from the whole series (neighbours may lie in the next
        # batch), one batch at a time so the widened input never exists for the whole series at once.
        parts = [cnn(self._batch_input(x, i, k)) for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()

    def _batch_input(self, x: torch.Tensor, start: int, neighbours: int) -> torch.Tensor:
        """The CNN's input for slices start .. start + batch_size from the series' per-slice windows."""
        batch = stack_neighbours(x, neighbours, start, start + self.batch_size)
        return batch if neighbours == 0 else batch.contiguous(memory_format=torch.channels_last)

    def _predict_explained(self, x: torch.Tensor, hu: np.ndarray, max_cam_slices: int | None,
                           pixel_spacing_mm: float) -> tuple[np.ndarray, dict[tuple[int, str], np.ndarray]]:
        """One forward pass that keeps the CAM layer's activations as graph leaves, then Grad-CAM from them.

        Parameters are frozen, so autograd records only what follows the CAM layer (the CNN's last
        blocks, the selector and the BiLSTM), not the backbone before it.
        """
        acts: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            leaf = output.detach().requires_grad_(True)  # the graph starts here
            acts.append(leaf)
            return leaf

        with torch.inference_mode(False), torch.enable_grad(), frozen(self.model):
            if x.is_inference():
                x = x.clone()
            handle = self.model.cnn.cam_layer.register_forward_hook(keep)
            try:
                cnn_logits, features = self._cnn(x)
            finally:
                handle.remove()
            # cuDNN's LSTM cannot run backward in eval mode; the native kernel can (same numbers).
            with torch.backends.cudnn.flags(enabled=False):
                logits = self.model.sequence_logits(features.unsqueeze(0), cnn_logits.unsqueeze(0))[0]
            # Calibration is monotonic per class: Grad-CAM of the raw logit explains the calibrated call.
            calibrated = self.calibration.calibrated_logits(logits.detach())
            probs = torch.sigmoid(calibrated).cpu().numpy().astype(np.float64)
            pairs = self.cam_pairs(probs, max_cam_slices)
            if not pairs:
                return probs, {}
            outputs = logits if self.explain == "decision" else cnn_logits
            maps = cams_from_activations(acts, (cnn_logits, features), outputs,
                                         [(i, CLASSES.index(c)) for i, c in pairs],
                                         out_size=(hu.shape[1], hu.shape[2]))
        masks: dict[int, np.ndarray] = {}
        heatmaps = {}
        for k, (i, c) in enumerate(pairs):
            if i not in masks:
                masks[i] = intracranial_mask(hu[i], pixel_spacing_mm)
            heatmaps[(i, c)] = mask_heatmap(maps[k].numpy(), masks[i])
        return probs, heatmaps

    def cam_pairs(self, probs: np.ndarray, max_cam_slices: int | None = None) -> list[tuple[int, str]]:
        """(slice, class) pairs at or above the class threshold, slices ordered by their highest positive
        probability, cut to max_cam_slices slices (each keeps all its positive classes)."""
        positive = positive_mask(probs, self.thresholds)  # (n, 6), the report's own rule
        slices = np.flatnonzero(positive.any(axis=1))
        strength = np.where(positive, probs, -1.0).max(axis=1)
        slices = sorted(slices.tolist(), key=lambda i: -strength[i])
        if max_cam_slices is not None:
            slices = slices[:max(0, max_cam_slices)]
        return [(int(i), c) for i in slices for k, c in enumerate(CLASSES) if positive[i, k]]
