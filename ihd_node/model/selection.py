"""Feature selection between the CNN and the BiLSTM (paper section 3.2): PCA, |head weight|, std.

Selectors are fitted once with numpy/scikit-learn and then applied in torch; their numbers are
buffers, so they travel inside the model's state_dict (one checkpoint file holds everything).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ihd_node.model.presets import SELECTOR_KINDS


class FeatureSelector(nn.Module):
    """(…, in_dim) features -> (…, out_dim)."""

    kind: str

    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if not 0 < out_dim <= in_dim:
            raise ValueError(f"selector out_dim {out_dim} must be in 1..{in_dim}")
        self.kind = kind
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_dim={self.in_dim}, out_dim={self.out_dim}"


class PCASelector(FeatureSelector):
    """Projection onto fitted principal components: (x - mean) @ components.T, as sklearn's transform."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        components = torch.as_tensor(components, dtype=torch.float32)
        super().__init__("pca", components.shape[1], components.shape[0])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1).clone())
        self.register_buffer("components", components.clone())
        if self.mean.shape[0] != self.in_dim:
            raise ValueError(f"PCA mean has {self.mean.shape[0]} values, components expect {self.in_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T


class IndexSelector(FeatureSelector):
    """Keeps a fixed subset of feature indices (the weight-based and std-based methods)."""

    def __init__(self, indices: Sequence[int] | np.ndarray | torch.Tensor, *, in_dim: int | None = None,
                 kind: str = "std") -> None:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        in_dim = int(idx.max()) + 1 if in_dim is None else int(in_dim)
        super().__init__(kind, in_dim, idx.size)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= in_dim):
            raise ValueError(f"selector indices must lie in 0..{in_dim - 1}")
        self.register_buffer("indices", torch.as_tensor(idx.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.indices)


def _top(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) scores, best first; ties keep the lower index (stable)."""
    order = np.argsort(-scores if largest else scores, kind="stable")
    return order[:k]


def per_class_top(weight: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """k feature indices chosen class by class in turn: each class adds its best not yet chosen feature
    (by |weight| of that class), so every output class gets about k / classes features of its own."""
    ranked = [_top(np.abs(row), row.size, largest) for row in weight]
    chosen: list[int] = []
    taken = np.zeros(weight.shape[1], dtype=bool)
    cursor = [0] * len(ranked)
    while len(chosen) < k:
        for c, order in enumerate(ranked):
            while cursor[c] < order.size and taken[order[cursor[c]]]:
                cursor[c] += 1
            if cursor[c] < order.size and len(chosen) < k:
                taken[order[cursor[c]]] = True
                chosen.append(int(order[cursor[c]]))
    return np.asarray(chosen, dtype=np.int64)


def fit_selector(kind: str, features: np.ndarray, out_dim: int,
                 head_weight: np.ndarray | None = None, *, seed: int = 0,
                 weight_reading: str = "per_class") -> FeatureSelector:
    """Fit a selector on un-augmented CNN features (N, D).

    weight_*: the paper's "features with the lowest or highest weights (in absolute value) for each output
    class" (section 3.2). weight_reading "per_class" (default) reads it literally: the classes take
    turns, each adding its own next best feature by |weight| of its row of the CNN's linear head;
    "summed" ranks features once by |weight| summed over the 6 classes.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got {features.shape}")
    n, d = features.shape
    if kind not in SELECTOR_KINDS:
        raise ValueError(f"unknown selector {kind!r}; choose one of {', '.join(SELECTOR_KINDS)}")
    if not 0 < out_dim <= d:
        raise ValueError(f"out_dim {out_dim} must be in 1..{d}")
    if kind == "pca":
        from sklearn.decomposition import PCA  # imported here: only fitting needs scikit-learn

        if n < out_dim:
            raise ValueError(f"PCA to {out_dim} components needs at least {out_dim} feature vectors, got {n}")
        pca = PCA(n_components=out_dim, random_state=seed).fit(features)
        return PCASelector(torch.from_numpy(pca.mean_), torch.from_numpy(pca.components_))
    if kind == "std":
        return IndexSelector(_top(features.std(axis=0), out_dim, largest=True), in_dim=d, kind=kind)
    if head_weight is None:
        raise ValueError(f"selector {kind!r} needs the CNN head's weight matrix (classes, D)")
    weight = np.asarray(head_weight, dtype=np.float64)
    if weight.ndim != 2 or weight.shape[1] != d:
        raise ValueError(f"head_weight must be (classes, {d}), got {weight.shape}")
    largest = kind == "weight_largest"
    if weight_reading == "per_class":
        return IndexSelector(per_class_top(weight, out_dim, largest), in_dim=d, kind=kind)
    if weight_reading != "summed":
        raise ValueError(f"unknown weight_reading {weight_reading!r}; use per_class or summed")
    scores = np.abs(weight).sum(axis=0)
    return IndexSelector(_top(scores, out_dim, largest=largest), in_dim=d, kind=kind)


def build_selector(kind: str, in_dim: int, out_dim: int) -> FeatureSelector:
    """An unfitted selector of the right shapes, to be filled by load_state_dict from a checkpoint."""
    if kind == "pca":
        return PCASelector(torch.zeros(in_dim), torch.zeros(out_dim, in_dim))
    if kind in SELECTOR_KINDS:
        return IndexSelector(np.arange(out_dim), in_dim=in_dim, kind=kind)
    raise ValueError(f"unknown selector {kind!r}; choose one of {', '.join(SELECTOR_KINDS)}")
