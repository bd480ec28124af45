"""The scan-level model: a BiLSTM over the slices' selected features, then a per-slice linear classifier.

Paper section 3.2 / Figure 3: the LSTM's per-slice output is concatenated with the CNN's 6 per-slice
probabilities before the final layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class SequenceHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int, bidirectional: bool, dropout: float,
                 concat_cnn_probs: bool, num_classes: int = 6) -> None:
        super().__init__()
        self.concat_cnn_probs = concat_cnn_probs
        self.num_classes = num_classes
        # nn.LSTM applies dropout between layers only; with one layer it would only warn.
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        out_dim = hidden * (2 if bidirectional else 1) + (num_classes if concat_cnn_probs else 0)
        self.classifier = nn.Linear(out_dim, num_classes)

    def forward(self, features: torch.Tensor, cnn_probs: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """features (B, T, k), cnn_probs (B, T, 6), lengths (B,) of real slices -> logits (B, T, 6).

        With lengths, the batch is packed so the backward direction starts at each scan's last real
        slice: padding never reaches a real step. Outputs at padded steps are meaningless.
        """
        if lengths is None:
            hidden, _ = self.lstm(features)
        else:
            packed = pack_padded_sequence(features, torch.as_tensor(lengths).cpu(), batch_first=True,
                                          enforce_sorted=False)
            hidden, _ = self.lstm(packed)
            hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=features.shape[1])
        if self.concat_cnn_probs:
            hidden = torch.cat([hidden, cnn_probs.to(hidden.dtype)], dim=-1)
        return self.classifier(hidden)
