"""Stage 1: fine-tune the CNN on single slices (Adam; lr for 2 epochs, then lr / 5 for 1; augmentation;
mixed precision on CUDA), resumable from its last saved epoch or step (WORK/cnn/state.pt)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ihd_node.model.input import stack_neighbours
from training.augment import Augmenter, to_input
from training.data import ScanStore, SliceDataset, balanced_slice_weights, epoch_indices
from training.losses import loss_function
from training.metrics import evaluate_scans
from training.options import (
    TrainingError,
    TrainOptions,
    atomic_save,
    check_config,
    load_state,
    log,
    resolve_device,
)
from training.progress import progress


def build_cnn(opts: TrainOptions) -> torch.nn.Module:
    from ihd_node.model.cnn import SliceCNN

    torch.manual_seed(opts.seed)
    cnn = SliceCNN(opts.config.backbone, num_classes=opts.config.num_classes,
                   weights_path=opts.backbone_weights, in_channels=opts.config.in_channels)
    if opts.bn_momentum is not None:
        for module in cnn.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = opts.bn_momentum
    return cnn


def _stage_outputs(cnn: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose outputs are the backbone's successive feature maps (MobileNet/EfficientNet blocks,
    ResNet layers); empty for other backbones, which then get the auxiliary loss on the last map only."""
    backbone = cnn.backbone
    if isinstance(getattr(backbone, "features", None), torch.nn.Sequential):
        return list(backbone.features.children())
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        return [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    return []


class MaskHead(torch.nn.Module):
    """Auxiliary 1x1 convolutions on feature maps predicting where each class's lesion lies.

    Used only in training on data with lesion masks (phantoms): dense targets teach a network trained
    from scratch where to look far faster than one label per slice, and make its Grad-CAM maps point at
    the lesion. Besides the final map, the last maps at strides 8 and 16 get a head too,
    so early layers learn what blood looks like. Not part of the exported model.
    """

    def __init__(self, cnn: torch.nn.Module, input_size: int, num_classes: int,
                 strides: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        stages = _stage_outputs(cnn)
        # The final feature map (feature_dim channels), whatever layer inference uses for Grad-CAM.
        last = stages[-1] if stages else cnn.cam_layer
        layers: list[torch.nn.Module] = [last]
        shapes: dict[int, tuple[int, int]] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, k=k: shapes.__setitem__(k, tuple(o.shape[1:3])))
                 for k, m in enumerate(stages)]
        training = cnn.training
        cnn.eval()  # a probe pass must not touch BatchNorm statistics
        with torch.no_grad():
            cnn(torch.zeros(1, cnn.in_channels, input_size, input_size, device=next(cnn.parameters()).device))
        cnn.train(training)
        for h in hooks:
            h.remove()
        channels = [int(cnn.feature_dim)]
        for stride in strides:
            hits = [k for k, (_, h) in shapes.items() if h == input_size // stride]
            if hits and stages[max(hits)] is not last:
                layers.append(stages[max(hits)])
                channels.append(shapes[max(hits)][0])
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, num_classes, kernel_size=1) for c in channels)
        self.fmaps: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [m.register_forward_hook(lambda mod, i, o, k=k: self.fmaps.__setitem__(k, o))
                        for k, m in enumerate(layers)]

    def loss(self, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
        """Mean over maps of the BCE of the map logits against the masks max-pooled to the map's grid
        (first channel = any)."""
        total = torch.zeros((), device=masks.device)
        for conv, fmap in zip(self.convs, self.fmaps, strict=True):
            assert fmap is not None
            fmap = fmap[has_mask]
            if fmap.shape[0] == 0:
                return total
            target = F.adaptive_max_pool2d(masks[has_mask], fmap.shape[-2:])
            target = torch.cat([target.amax(dim=1, keepdim=True), target], dim=1)
            total = total + F.binary_cross_entropy_with_logits(conv(fmap.float()), target)
        return total / len(self.convs)


def mask_channels(masks: torch.Tensor, n_subtypes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S) uint8 bitmasks -> ((B, K, S, S) float maps, (B,) bool: the slice has a mask)."""
    from training.data import NO_MASK

    has = masks[:, 0, 0] != NO_MASK
    bits = torch.stack([((masks >> k) & 1) for k in range(n_subtypes)], dim=1).float()
    return bits * has.view(-1, 1, 1, 1), has


def cnn_lr(opts: TrainOptions, epoch: int) -> float:
    base = opts.cnn_lr * opts.lr_scale
    return base if epoch < opts.cnn_lr_drop_epoch else base * opts.cnn_lr_drop


def _batches(indices: np.ndarray, batch_size: int, skip_batches: int) -> Iterator[list[int]]:
    for start in range(skip_batches * batch_size, len(indices), batch_size):
        yield indices[start:start + batch_size].tolist()


def stage_cnn(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    path = opts.work / "cnn" / "state.pt"
    state = load_state(path)
    if state is not None:
        check_config(state, opts, "cnn")
        if state.get("done") and int(state["epoch"]) >= opts.cnn_epochs:
            log(opts, f"stage cnn: finished earlier ({path}); skipped")
            return state
    device = resolve_device(opts.device)
    cnn = build_cnn(opts).to(device)
    n_sub = opts.config.num_classes - 1
    mask_head = MaskHead(cnn, opts.config.input_size, opts.config.num_classes).to(device) \
        if opts.mask_weight > 0 else None
    params = list(cnn.parameters()) + (list(mask_head.parameters()) if mask_head else [])
    optimiser = torch.optim.Adam(params, lr=cnn_lr(opts, 0), weight_decay=opts.weight_decay)
    use_amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    epoch, step, history = 0, 0, []
    if state is not None:
        cnn.load_state_dict(state["model"])
        if mask_head is not None and state.get("mask_head"):
            mask_head.load_state_dict(state["mask_head"])
        optimiser.load_state_dict(state["optimizer"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state.get("history", []))
        log(opts, f"stage cnn: resuming at epoch {epoch + 1}, step {step}")

    criterion = loss_function(opts)
    train = SliceDataset(store, splits["train"], neighbours=opts.config.neighbours)
    if len(train) == 0:
        raise TrainingError("the training split has no slices; prepare more scans or use a smaller "
                            "--val-fraction")
    weights = balanced_slice_weights(train.labels, opts.positive_share)
    n_samples = opts.epoch_size or len(train)
    gen = torch.Generator().manual_seed(opts.seed * 1000 + epoch * 100 + step)
    augmenter = Augmenter(opts.augment, generator=gen)

    def save(done: bool = False) -> None:
        atomic_save({
            "config": opts.config.to_dict(), "options": opts.jsonable(), "epoch": epoch, "step": step,
            "done": done, "run_id": uuid.uuid4().hex if done else "", "history": history,
            "model": cnn.state_dict(), "optimizer": optimiser.state_dict(),
            "mask_head": mask_head.state_dict() if mask_head is not None else {},
            "scaler": scaler.state_dict() if use_amp else {},
        }, path)

    while epoch < opts.cnn_epochs:
        for group in optimiser.param_groups:
            group["lr"] = cnn_lr(opts, epoch)
        indices = epoch_indices(weights, n_samples, opts.seed, epoch)
        n_batches = math.ceil(len(indices) / opts.batch_size)
        loader = torch.utils.data.DataLoader(
            train, batch_sampler=list(_batches(indices, opts.batch_size, step)), num_workers=opts.workers,
            pin_memory=device.type == "cuda", persistent_workers=False)
        cnn.train()
        running, seen = 0.0, 0
        bar = progress(loader, total=n_batches - step, desc=f"cnn epoch {epoch + 1}/{opts.cnn_epochs}",
                       enabled=opts.verbose)
        started = time.monotonic()
        for images, labels, masks in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if mask_head is not None:
                maps, has_mask = mask_channels(masks.to(device), n_sub)
                x, maps = augmenter(images, maps)
            else:
                x = augmenter(images)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits, _ = cnn(x)
            loss = criterion(logits, labels)
            if mask_head is not None:
                loss = loss + opts.mask_weight * mask_head.loss(maps, has_mask)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if seen else loss.item()
            seen += 1
            bar.set_postfix(loss=running, lr=optimiser.param_groups[0]["lr"])
            if opts.save_every and step % opts.save_every == 0:
                save()
        history.append({"epoch": epoch + 1, "train_loss": running,
                        "seconds": round(time.monotonic() - started, 1)})
        epoch, step = epoch + 1, 0
        val = splits.get("val") or []
        if val and (opts.val_every_epoch or epoch >= opts.cnn_epochs):
            metrics = evaluate_cnn(cnn, store, val, device, opts)
            history[-1]["val_slice_log_loss"] = metrics["slice"]["log_loss"]
            history[-1]["val_scan_auc_any"] = metrics["scan"]["classes"]["any"]["auc"]
            log(opts, f"cnn epoch {epoch}: train loss {running:.4f}, val slice log loss "
                       f"{metrics['slice']['log_loss']:.4f}, "
                       f"val scan AUC(any) {history[-1]['val_scan_auc_any']:.3f}")
        save(done=epoch >= opts.cnn_epochs)
    state = load_state(path)
    assert state is not None
    return state


@torch.no_grad()
def cnn_outputs(cnn: torch.nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 64,
                amp: bool = False, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) cached images of one scan -> (logits (n, 6), features (n, D)) float32 on the CPU, no
    augmentation; 2.5D (neighbours > 0) stacks each slice's neighbours as the node's Predictor does.
    Without `neighbours`, the CNN's own input width says it (every caller, the fold CNNs' too)."""
    if neighbours is None:
        neighbours = (int(getattr(cnn, "in_channels", 3)) // 3 - 1) // 2
    logits, feats = [], []
    for start in range(0, images.shape[0], chunk):
        x = to_input(stack_neighbours(images, neighbours, start, start + chunk).to(device))
        use_amp = amp and device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            lo, fe = cnn(x)
        logits.append(lo.float().cpu())
        feats.append(fe.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def evaluate_cnn(cnn: torch.nn.Module, store: ScanStore, scan_ids: Sequence[str], device: torch.device,
                 opts: TrainOptions) -> dict[str, Any]:
    """Slice- and scan-level metrics of the CNN alone (max over slices for the scan)."""
    cnn.eval()
    labels, probs = [], []
    for sid in scan_ids:
        logits, _ = cnn_outputs(cnn, torch.from_numpy(np.array(store.images(sid))), device, amp=opts.amp,
                                neighbours=opts.config.neighbours)
        probs.append(torch.sigmoid(logits).numpy())
        labels.append(store.labels(sid))
    cnn.train()
    return evaluate_scans(labels, probs)
