"""Where the pretrained backbone comes from: `--weights imagenet` (torchvision's published ImageNet weights,
downloaded once into torch's hub cache) or `--weights FILE` (a local state_dict)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ihd_node.errors import UserError


def imagenet_weights(backbone: str, download: bool = True) -> Path:
    """The local file of torchvision's default ImageNet weights for the backbone, downloading it when absent.

    The file lives where torch.hub keeps checkpoints ($TORCH_HOME/hub/checkpoints, default
    ~/.cache/torch/hub/checkpoints), under the name torchvision publishes it with, so a machine without
    internet can be given the file by copying it there.
    """
    import torch
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision publishes no ImageNet weights for {backbone!r}; pass --weights FILE") \
            from None
    url = weights.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if target.is_file():
        return target
    where = (f"download {url} on a machine with internet and copy it to {target} (or pass "
             f"--weights FILE)")
    if not download:
        raise UserError(f"ImageNet weights for {backbone} are not in {target.parent} and downloading is "
                        f"off (--offline); {where}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading ImageNet weights for {backbone}: {url} -> {target}", flush=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # no network, proxy, disk full: all end the same way for the user
        target.unlink(missing_ok=True)
        raise UserError(f"could not download ImageNet weights for {backbone} ({type(exc).__name__}: "
                        f"{exc}); {where}") from None
    return target


def resolve_weights(spec: str | None, backbone: str, *, preset: str, from_scratch: bool,
                    download: bool = True) -> str | None:
    """The backbone weights file for a run, or None for random initialisation (only when allowed)."""
    if spec and from_scratch:
        raise UserError("--weights and --from-scratch contradict each other; give one of them")
    if not spec:
        if preset == "paper" and not from_scratch:
            raise UserError("the paper preset fine-tunes a pretrained backbone: pass --weights imagenet "
                            "(torchvision's ImageNet weights) or --weights FILE, or --from-scratch to "
                            "train from random initialisation on purpose")
        return None
    if spec == "imagenet":
        return str(imagenet_weights(backbone, download=download))
    if not Path(spec).is_file():
        raise UserError(f"--weights {spec}: no such file; give a state_dict file or 'imagenet'")
    return spec
