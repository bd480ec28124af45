"""Grad-CAM on the CNN's last stage, batched, for chosen (slice, class) pairs only.

Each slice is passed forward once; its activations at `cnn.cam_layer` become a fresh leaf tensor,
so gradients are computed only for the few layers after it (pooling and the linear head), not for
the whole backbone. A slice wanted for several classes gets one cheap backward per class round,
each with every image's own target (a single shared target would explain only one class).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ihd_node.classes import SUBTYPES


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients and eval mode: autograd then records nothing before the CAM layer."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    training = module.training
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(training)


def _normalise(cams: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(k, h, w) ReLU'd maps -> (k, rows, cols) in [0, 1], each map divided by its own peak."""
    cams = F.interpolate(cams.unsqueeze(1), size=out_size, mode="bilinear", align_corners=False)[:, 0]
    peak = cams.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


def grad_cam(cnn: nn.Module, images: torch.Tensor, targets: Sequence[tuple[int, int]],
             out_size: tuple[int, int] | None = None, batch_size: int = 16) -> torch.Tensor:
    """Heatmaps for (image index, class index) pairs -> (len(targets), rows, cols) float32 on the CPU.

    `cnn` is a SliceCNN (logits first in its output, `cam_layer` property); `images` (n, 3, S, S) is
    the prepared input. Maps are bilinearly upsampled to out_size (default S x S), ReLU'd, scaled to [0, 1].
    """
    out_size = tuple(out_size or images.shape[-2:])
    if not targets:
        return torch.zeros((0, *out_size), dtype=torch.float32)
    by_image: dict[int, list[tuple[int, int]]] = {}  # image -> [(position in targets, class)]
    for pos, (img, cls) in enumerate(targets):
        by_image.setdefault(int(img), []).append((pos, int(cls)))
    wanted = sorted(by_image)

    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)  # the graph starts here
        captured.append(leaf)
        return leaf

    with torch.inference_mode(False), torch.enable_grad(), frozen(cnn):
        # Created here so it is a normal tensor (written in place) even when called in inference mode.
        result = torch.zeros((len(targets), *out_size), dtype=torch.float32)
        handle = cnn.cam_layer.register_forward_hook(hook)
        try:
            for start in range(0, len(wanted), batch_size):
                chunk = wanted[start:start + batch_size]
                index = torch.as_tensor(chunk, device=images.device)
                batch = images.index_select(0, index).clone()  # a normal tensor, even from inference mode
                captured.clear()
                logits = cnn(batch)[0]
                act = captured[-1]
                rounds = max(len(by_image[i]) for i in chunk)
                for r in range(rounds):
                    # (row in batch, position in targets, class) of the images with an r-th class
                    rows = [(row, *by_image[i][r]) for row, i in enumerate(chunk) if r < len(by_image[i])]
                    row_idx = torch.as_tensor([x[0] for x in rows], device=logits.device)
                    cls_idx = torch.as_tensor([x[2] for x in rows], device=logits.device)
                    # Sum of each image's own target logit: image i's gradient sees only its target.
                    target = logits[row_idx, cls_idx].sum()
                    (grad,) = torch.autograd.grad(target, act, retain_graph=r < rounds - 1)
                    weights = grad[row_idx].mean(dim=(2, 3), keepdim=True)
                    cams = torch.relu((weights * act.detach()[row_idx]).sum(dim=1))
                    maps = _normalise(cams.float(), out_size).cpu()
                    result[torch.as_tensor([x[1] for x in rows])] = maps
        finally:
            handle.remove()
    return result


def peak_in_mask(heatmap: np.ndarray, mask: np.ndarray, margin: int = 0) -> bool:
    """True when the heatmap's peak lies inside the mask or within `margin` pixels of it (Chebyshev).

    Helper for checking that a trained model's Grad-CAM points at the lesion.
    """
    heatmap = np.asarray(heatmap)
    mask = np.asarray(mask).astype(bool)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} differ in shape")
    if not mask.any():
        return False
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    rows, cols = np.nonzero(mask)
    return bool(np.min(np.maximum(np.abs(rows - r), np.abs(cols - c))) <= margin)


def lesion_hits(heatmaps: dict[tuple[int, str], np.ndarray], masks: np.ndarray,
                margin: int = 0) -> tuple[int, int]:
    """(hits, judged) over heatmaps of slices that really hold the class's lesion.

    masks: (n, rows, cols) bitmasks as the phantom writes them (bit k = SUBTYPES[k]); `any` uses every
    bit. Maps of slices without that lesion (false positives) are not judged.
    """
    hits = judged = 0
    for (index, cls), heat in heatmaps.items():
        mask = masks[index] != 0 if cls == "any" else (masks[index] >> SUBTYPES.index(cls)) & 1
        if not np.any(mask):
            continue
        judged += 1
        hits += peak_in_mask(heat, mask, margin)
    return hits, judged


EXPLAIN_MODES = ("decision", "cnn")


def cams_from_activations(acts: Sequence[torch.Tensor], slice_outputs: Sequence[torch.Tensor],
                          outputs: torch.Tensor, targets: Sequence[tuple[int, int]],
                          out_size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM from activations kept by the forward pass -> (len(targets), rows, cols) float32, CPU.

    `acts` are the CAM layer's outputs of consecutive slice batches, each a leaf that requires grad.
    `slice_outputs` are what the CNN made of them per slice (its logits and pooled features, (n, ...)
    each, concatenated over the batches); `outputs` (n, classes) are the logits to explain, computed from
    slice_outputs: the CNN's own, or the BiLSTM's, which mix every slice. A target's map is weighted by
    the gradient of its logit with respect to its own slice's activations.

    The CNN handles each slice alone, so that gradient is (d logit / d slice_outputs[slice]) pulled back
    through that slice's CNN tail. The first factor comes from one cheap backward per target through the
    sequence model only; the pull-back then runs batched, one backward per round in which each slice
    has at most one target (other slices' tails do not touch a slice's activations).
    """
    result = torch.zeros((len(targets), *out_size), dtype=torch.float32)
    if not targets:
        return result
    starts = [0]
    for a in acts:
        starts.append(starts[-1] + a.shape[0])
    by_slice: dict[int, list[tuple[int, int]]] = {}  # slice -> [(position in targets, class)]
    for pos, (index, cls) in enumerate(targets):
        by_slice.setdefault(int(index), []).append((pos, int(cls)))
    # d logit / d (this slice's CNN outputs), for each target.
    upstream: dict[int, list[torch.Tensor]] = {}
    for pos, (index, cls) in enumerate(targets):
        grads = torch.autograd.grad(outputs[index, cls], list(slice_outputs), retain_graph=True,
                                    allow_unused=True)
        upstream[pos] = [torch.zeros_like(t[index]) if g is None else g[index]
                         for g, t in zip(grads, slice_outputs, strict=True)]
    rounds = max(len(v) for v in by_slice.values())
    for r in range(rounds):
        rows = [(index, *items[r]) for index, items in sorted(by_slice.items()) if r < len(items)]
        surrogate = sum((up * t[index]).sum() for index, pos, _ in rows
                        for up, t in zip(upstream[pos], slice_outputs, strict=True))
        grads = torch.autograd.grad(surrogate, list(acts), retain_graph=True, allow_unused=True)
        for index, pos, _ in rows:
            b = max(j for j in range(len(acts)) if starts[j] <= index)
            row = index - starts[b]
            grad = grads[b]
            if grad is None:
                continue
            weights = grad[row:row + 1].mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * acts[b].detach()[row:row + 1]).sum(dim=1))
            result[pos] = _normalise(cam.float(), out_size)[0].cpu()
    return result


def mask_heatmap(heat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Heat outside the mask set to zero, the rest rescaled so its peak is 1 (all zero for an empty mask)."""
    out = np.where(mask, np.asarray(heat, dtype=np.float32), np.float32(0.0))
    peak = float(out.max()) if out.size else 0.0
    return out / peak if peak > 0 else np.zeros_like(out)
