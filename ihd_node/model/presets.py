"""Architecture settings as one frozen, JSON-safe value, and the named presets.

A checkpoint stores `ModelConfig.to_dict()`, so a model can be rebuilt from the file alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD, CLASSES, PAPER_INPUT_SIZE, WINDOWS
from ihd_node.errors import UserError
from ihd_node.model.input import input_channels

SELECTOR_KINDS: tuple[str, ...] = ("pca", "weight_smallest", "weight_largest", "std")
MAX_NEIGHBOURS = 4  # 2.5D input: at most 9 slices per input (27 channels)

# Pooled feature size of each supported backbone (checked against the built network in the tests).
BACKBONE_FEATURE_DIMS: dict[str, int] = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnext50_32x4d": 2048, "resnext101_32x8d": 2048,
    "mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "efficientnet_b0": 1280, "regnet_y_400mf": 440,
    "shufflenet_v2_x1_0": 1024,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the network and prepare its input (not the learned numbers)."""

    backbone: str
    feature_dim: int
    selector: str
    selected_dim: int
    lstm_layers: int
    lstm_hidden: int
    bidirectional: bool
    dropout: float
    concat_cnn_probs: bool
    input_size: int
    classes: tuple[str, ...] = CLASSES
    windows: tuple[tuple[float, float], ...] = WINDOWS
    mean: tuple[float, ...] = CHANNEL_MEAN
    std: tuple[float, ...] = CHANNEL_STD
    # Slices on each side stacked into a slice's input (ihd_node.model.input); 0 = the paper's single slice.
    neighbours: int = 0

    def __post_init__(self) -> None:
        if self.selector not in SELECTOR_KINDS:
            raise ValueError(f"selector {self.selector!r} is not one of {', '.join(SELECTOR_KINDS)}")
        if not 0 < self.selected_dim <= self.feature_dim:
            raise ValueError(f"selected_dim {self.selected_dim} must be in 1..{self.feature_dim}")
        if self.lstm_layers < 1 or self.lstm_hidden < 1 or self.input_size < 16:
            raise ValueError("lstm_layers and lstm_hidden must be >= 1 and input_size >= 16")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if len(self.windows) != 3 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("windows, mean and std need exactly three channels")
        if not 0 <= self.neighbours <= MAX_NEIGHBOURS:
            raise ValueError(f"neighbours {self.neighbours} must be in 0..{MAX_NEIGHBOURS}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Channels of the CNN's input: 3 windows x (2 neighbours + 1) slices."""
        return input_channels(self.neighbours)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of str/int/float/bool/lists: safe for JSON and for torch.load(weights_only=True)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["windows"] = [[float(c), float(w)] for c, w in self.windows]
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; raises ValueError naming missing or unknown keys."""
        names = {f.name for f in fields(cls)}
        # Checkpoints written before the 2.5D option have no "neighbours": they are single-slice models.
        data = {"neighbours": 0, **data}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"model config: missing keys {missing}, unknown keys {unknown}")
        d = dict(data)
        d["classes"] = tuple(str(c) for c in d["classes"])
        d["windows"] = tuple((float(c), float(w)) for c, w in d["windows"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        for key in ("feature_dim", "selected_dim", "lstm_layers", "lstm_hidden", "input_size", "neighbours"):
            d[key] = int(d[key])
        for key in ("bidirectional", "concat_cnn_probs"):
            d[key] = bool(d[key])
        d["dropout"] = float(d["dropout"])
        d["backbone"] = str(d["backbone"])
        d["selector"] = str(d["selector"])
        return cls(**d)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # The published architecture (paper section 3.2, Table 2 best row).
    "paper": ModelConfig(
        backbone="resnext101_32x8d", feature_dim=2048, selector="pca", selected_dim=120,
        lstm_layers=3, lstm_hidden=256, bidirectional=True, dropout=0.3, concat_cnn_probs=True,
        input_size=PAPER_INPUT_SIZE,
    ),
    # A small backbone for CPU inference; the shipped default model uses it.
    "compact": ModelConfig(
        backbone="mobilenet_v3_small", feature_dim=576, selector="pca", selected_dim=64,
        lstm_layers=2, lstm_hidden=64, bidirectional=True, dropout=0.3, concat_cnn_probs=True,
        input_size=PAPER_INPUT_SIZE,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def tiny_config(backbone: str = "resnet18", input_size: int = 64, **changes: Any) -> ModelConfig:
    """A very small model for tests and smoke runs (not a preset: nothing should ship with it)."""
    base = ModelConfig(
        backbone=backbone, feature_dim=BACKBONE_FEATURE_DIMS[backbone], selector="pca", selected_dim=8,
        lstm_layers=1, lstm_hidden=8, bidirectional=True, dropout=0.0, concat_cnn_probs=True,
        input_size=input_size,
    )
    return replace(base, **changes)
