"""The whole model of the paper: CNN per slice -> feature selection -> BiLSTM over the scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ihd_node.model.cnn import SliceCNN
from ihd_node.model.input import stack_neighbours
from ihd_node.model.presets import ModelConfig
from ihd_node.model.selection import FeatureSelector, build_selector
from ihd_node.model.sequence import SequenceHead


class IhdModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.cnn = SliceCNN(config.backbone, num_classes=config.num_classes, weights_path=backbone_weights,
                            in_channels=config.in_channels)
        if self.cnn.feature_dim != config.feature_dim:
            raise ValueError(f"config feature_dim {config.feature_dim} does not match {config.backbone}'s "
                             f"{self.cnn.feature_dim}")
        self.selector: FeatureSelector = build_selector(config.selector, config.feature_dim,
                                                        config.selected_dim)
        self.sequence = SequenceHead(config.selected_dim, config.lstm_hidden, config.lstm_layers,
                                     config.bidirectional, config.dropout, config.concat_cnn_probs,
                                     num_classes=config.num_classes)

    def set_selector(self, selector: FeatureSelector) -> None:
        """Install a fitted selector (training stage 2); it must have the shapes and kind of the config."""
        want = (self.config.selector, self.config.feature_dim, self.config.selected_dim)
        got = (selector.kind, selector.in_dim, selector.out_dim)
        if got != want:
            raise ValueError(f"selector (kind, in_dim, out_dim) {got} does not match the config's {want}")
        self.selector = selector.to(next(self.sequence.parameters()).device)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CNN pass over a batch of slices: (cnn_logits (n, 6), features (n, D))."""
        return self.cnn(x)

    def sequence_logits(self, features: torch.Tensor, cnn_logits: torch.Tensor,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scan-level stage from stored CNN outputs: features (B, T, D), cnn_logits (B, T, 6) -> (B, T, 6)."""
        return self.sequence(self.selector(features), torch.sigmoid(cnn_logits), lengths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One scan (n, 3, S, S) of per-slice windows, slices in spatial order -> per-slice logits (n, 6).

        2.5D models (config.neighbours > 0) stack each slice's neighbours here (ihd_node.model.input).
        """
        x = stack_neighbours(x, self.config.neighbours)
        cnn_logits, features = self.forward_features(x)
        return self.sequence_logits(features.unsqueeze(0), cnn_logits.unsqueeze(0))[0]

    @staticmethod
    def series_probabilities(slice_probs: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Scan-level probability per class = max over slices (paper)."""
        if isinstance(slice_probs, np.ndarray):
            return slice_probs.max(axis=-2)
        return slice_probs.amax(dim=-2)
