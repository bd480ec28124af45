"""One checkpoint file holds everything needed to run: config, preprocessing, classes, thresholds (and
the policy that chose them), the per-class calibration, the fitted selector, weights, name/version and
provenance.

It is a torch.save'd dict of plain types and tensors, read back with weights_only=True so a
checkpoint cannot execute code. Bad files raise CheckpointError saying which file and what is wrong.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.model.calibration import Calibration
from ihd_node.model.input import input_mode
from ihd_node.model.network import IhdModel
from ihd_node.model.presets import ModelConfig

FORMAT = "ihd-node-checkpoint"
# 2 added "calibration" and "thresholds_policy". Version 1 files still load (identity calibration); a
# version 2 file is refused by older readers, which would otherwise report uncalibrated probabilities.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "default.pt"
_REQUIRED = ("name", "version", "config", "classes", "thresholds", "provenance", "state_dict")


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged, foreign or does not fit its own config."""


@dataclass
class LoadedCheckpoint:
    model: IhdModel  # in eval mode, float32, on the CPU
    config: ModelConfig
    thresholds: dict[str, float]
    name: str
    version: str
    provenance: dict[str, Any]
    path: Path
    created: str = ""
    classes: tuple[str, ...] = field(default=CLASSES)
    calibration: Calibration = field(default_factory=Calibration)
    thresholds_policy: dict[str, Any] = field(default_factory=dict)  # how the thresholds were chosen


def _plain(value: Any, where: str = "provenance") -> Any:
    """Convert to JSON-like plain types (the only non-tensor types the safe loader accepts)."""
    # numpy scalars first: np.float64 is a float subclass, but the safe loader refuses it.
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if value is None:
        return None
    for plain_type in (bool, int, float, str):  # bool before int; strips subclasses such as TorchVersion
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint (use plain types)")


def _check_thresholds(thresholds: dict[str, Any], classes: tuple[str, ...]) -> dict[str, float]:
    missing = [c for c in classes if c not in thresholds]
    if missing:
        raise ValueError(f"thresholds missing for {missing}")
    out = {c: float(thresholds[c]) for c in classes}
    if not all(0.0 <= v <= 1.0 for v in out.values()):
        raise ValueError(f"thresholds must be probabilities in [0, 1]: {out}")
    return out


def save_checkpoint(path: str | Path, model: IhdModel, *, thresholds: dict[str, float], name: str,
                    version: str, provenance: dict[str, Any], half: bool = True,
                    calibration: Calibration | None = None, thresholds_policy: dict[str, Any] | None = None
                    ) -> Path:
    """Write the model and its metadata to one file (atomically). With half, parameters are stored as
    float16 (buffers, i.e. BatchNorm statistics and the selector, stay float32) to keep the file small."""
    path = Path(path)
    config = model.config
    parameter_names = {n for n, _ in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and key in parameter_names and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor.clone()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": str(name),
        "version": str(version),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": _plain(config.to_dict(), "config"),
        "preprocessing": {  # for readers of the file; the model itself uses the config
            "windows": [list(w) for w in config.windows], "mean": list(config.mean), "std": list(config.std),
            "input_size": config.input_size, "resize": "bilinear, align_corners=False, no antialias",
            # The model reads config.neighbours; this says it in words (absent in older files = single slice).
            "input": input_mode(config.neighbours), "neighbours": config.neighbours,
        },
        "classes": list(config.classes),
        "thresholds": _check_thresholds(thresholds, config.classes),
        "thresholds_policy": _plain(thresholds_policy or {}, "thresholds_policy"),
        "calibration": _plain((calibration or Calibration()).to_dict(), "calibration"),
        "provenance": _plain(provenance),
        "weights_dtype": "float16" if half else "float32",
        "torch_version": str(torch.__version__),  # TorchVersion is a class the safe loader refuses
        "state_dict": state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # readers never see a half-written checkpoint
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    if str(path) == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(f"the default model {DEFAULT_CHECKPOINT} is not there yet; "
                                  "run `make train-phantom` to build it, or give a checkpoint file")
        return DEFAULT_CHECKPOINT
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Safely read and check the container (format, version, keys) without building the model."""
    path = resolve_checkpoint(path)

    def fail(problem: str, fix: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {problem}; {fix}")

    if path.is_dir():
        raise fail("is a folder, not a file", "give the path of the .pt checkpoint file")
    if not path.is_file():
        raise fail("no such file", "check the path (or run `make train-phantom` for the default model)")
    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if size == 0:
        raise fail("the file is empty", "copy the checkpoint again")
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise fail("not an ihd-node checkpoint (not a torch zip archive; a text file or another format?)",
                   "give a checkpoint written by ihd-node training")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's message is long; its "Unsupported global: ..." line names the offending object.
        first = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else type(exc).__name__)
        raise fail(f"refused to load: it contains Python objects other than plain data and tensors ({first})",
                   "only checkpoints written by ihd-node are accepted; unknown pickles are never executed",
                   ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(f"truncated or corrupt ({first})", "copy or download the checkpoint again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            what = "a plain state_dict"
        else:
            what = f"a {type(data).__name__} without the {FORMAT!r} marker"
        raise fail(f"not an ihd-node checkpoint ({what})",
                   "write checkpoints with ihd_node.model.checkpoint.save_checkpoint (training does this)")
    if data.get("format_version") not in READABLE_VERSIONS:
        found = data.get("format_version")
        raise fail(f"format version {found!r}, this ihd-node reads versions "
                   f"{', '.join(map(str, READABLE_VERSIONS))}",
                   "use an ihd-node release that matches the checkpoint, or re-export it")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise fail(f"incomplete, missing {missing}", "re-export the checkpoint")
    return path, data


def _build(config: ModelConfig, state: dict[str, torch.Tensor]) -> IhdModel:
    """Build the model and load the weights; on the meta device first to skip a useless random init."""
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        with torch.device("meta"):
            model = IhdModel(config)
    except NotImplementedError:  # a few torchvision builders compute on tensors at construction
        model = IhdModel(config)
        model.load_state_dict(state, strict=True)
        return model
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("some tensors were not in the checkpoint")
    return model


def load_checkpoint(path: str | Path = "default") -> LoadedCheckpoint:
    """Load a checkpoint (or "default", the shipped model) into a float32 model in eval mode."""
    path, data = read_checkpoint(path)

    def fail(problem: str, fix: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {problem}; {fix}")

    try:
        config = ModelConfig.from_dict(data["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise fail(f"invalid model config ({exc})", "re-export the checkpoint") from None
    classes = tuple(data["classes"])
    if classes != CLASSES or config.classes != CLASSES:
        raise fail(f"classes {list(classes)} differ from this ihd-node's {list(CLASSES)}",
                   "use a checkpoint trained for the six RSNA classes in that order")
    try:
        thresholds = _check_thresholds(dict(data["thresholds"]), CLASSES)
    except (TypeError, ValueError) as exc:
        raise fail(f"bad thresholds ({exc})", "re-export the checkpoint") from None
    try:
        calibration = Calibration.from_dict(data.get("calibration"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise fail(f"bad calibration ({exc})", "re-export the checkpoint") from None
    policy = data.get("thresholds_policy") or {}
    state = data["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise fail("the weights are not a dict of tensors", "re-export the checkpoint")
    try:
        model = _build(config, state)
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:400]
        raise fail(f"the weights do not match its config ({config.backbone}): {detail}",
                   "the file was edited or written by an incompatible version; re-export it") from None
    model.eval()
    return LoadedCheckpoint(
        model=model, config=config, thresholds=thresholds, name=str(data["name"]),
        version=str(data["version"]), provenance=dict(data["provenance"]), path=path,
        created=str(data.get("created", "")), classes=classes, calibration=calibration,
        thresholds_policy=dict(policy) if isinstance(policy, dict) else {},
    )
