"""The paper's three training stages, resumable, on a prepared scan cache (see training/data.py).

  1. cnn       fine-tune the CNN on single slices (Adam; lr for 2 epochs, then lr / 5 for 1; augmentation;
               mixed precision on CUDA)
  2. features  extract CNN features and logits of every slice without augmentation; fit the selector on
               up to 30k training vectors (PCA by default)
  3. sequence  train the BiLSTM on whole scans (one scan per batch, Adam 1e-4, 4 epochs), CNN frozen and
               its outputs precomputed; then choose per-class thresholds on the validation split and
               export one checkpoint with ihd_node.model.checkpoint.save_checkpoint.

With `bilstm_features="oof"` (not in the paper; training/oof.py) the features stage also trains K fold
CNNs and writes out-of-fold inputs for the BiLSTM, which then trains in oof/sequence/ and exports
model-oof.pt; the CNN and selector stay the ones above.

Work folder layout: cache/ (scans), splits.json, cnn/state.pt, features/{raw,logits,selected}.npy +
index.json + selector.pt, sequence/state.pt, model.pt (oof/... and model-oof.pt with the option). Each
stage writes `done` into its state; a rerun skips finished stages and continues an unfinished one from
its last saved epoch (or step).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.model.input import stack_neighbours
from ihd_node.model.presets import ModelConfig
from training.augment import AugmentConfig, Augmenter, to_input
from training.data import ScanStore, SliceDataset, balanced_slice_weights, epoch_indices
from training.metrics import CLASS_WEIGHTS, choose_thresholds, evaluate_scans, format_metrics, jsonable
from training.progress import progress

STAGES: tuple[str, ...] = ("cnn", "features", "sequence")


@dataclass
class TrainOptions:
    """Everything a run needs besides the data; stored in each stage's state and the checkpoint."""

    work: Path
    config: ModelConfig
    device: str = "auto"
    seed: int = 0
    backbone_weights: str | None = None  # local pretrained state_dict for the backbone; random init if None
    # Stage 1 (paper: Adam, 1e-4 for 2 epochs then 2e-5 for 1, batch 32).
    cnn_epochs: int = 3
    cnn_lr: float = 1e-4
    cnn_lr_drop_epoch: int = 2  # epochs before this use cnn_lr, later ones cnn_lr * cnn_lr_drop
    cnn_lr_drop: float = 0.2
    lr_scale: float = 1.0  # multiplies both stages' learning rates (e.g. 10 when training from scratch)
    batch_size: int = 32
    epoch_size: int | None = None  # slices drawn per epoch; default: the number of training slices
    positive_share: float = 0.0  # 0 = natural distribution; >0 = that share of positives, even over subtypes
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool = True  # mixed precision, CUDA only
    workers: int = 0  # DataLoader worker processes
    save_every: int = 0  # also save the stage-1 state every N steps (0: at epoch ends only)
    val_every_epoch: bool = True  # CNN metrics on the validation split after every epoch (else the last only)
    weight_decay: float = 0.0
    bn_momentum: float | None = None  # e.g. 0.1 from scratch (MobileNet's default 0.01 lags a short run)
    mask_weight: float = 0.0  # weight of the auxiliary lesion-map loss on data with masks (phantoms)
    loss: str = "eq1"  # "eq1": the paper's Eq. 1 (plain sum over classes); "weighted": the challenge metric
    seq_clip: float = 5.0  # BiLSTM gradient-norm clipping (not in the paper; 0 = off)
    # What the BiLSTM is trained on: "in_sample" (paper) = the shipped CNN's features of its own training
    # slices; "oof" = out-of-fold features of `folds` CNNs trained on the other folds (training/oof.py).
    bilstm_features: str = "in_sample"
    folds: int = 5
    # Stage 2.
    pca_samples: int = 30000
    weight_reading: str = "per_class"  # weight_* selectors: "per_class" (paper) or "summed" over classes
    # Stage 3 (paper: Adam 1e-4, 4 epochs, one scan per batch).
    seq_epochs: int = 4
    seq_lr: float = 1e-4
    seq_batch: int = 1
    # Export.
    threshold_method: str = "youden"
    name: str = "ihd-node"
    version: str = "0.0.0"
    trained_on: str = ""
    verbose: bool = True

    def jsonable(self) -> dict[str, Any]:
        d = asdict(self)
        d["work"] = str(self.work)
        d["config"] = self.config.to_dict()
        return d


class TrainingError(UserError):
    """A training run cannot go on; the message says why and what to do."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TrainingError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def _log(opts: TrainOptions, msg: str) -> None:
    if opts.verbose:
        print(msg, flush=True)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: unreadable stage state ({type(exc).__name__}); "
                            "delete it to redo the stage") from None


def load_splits(work: Path) -> dict[str, list[str]]:
    path = work / "splits.json"
    if not path.is_file():
        raise TrainingError(f"{path}: no splits; run `python -m training prepare` first")
    return json.loads(path.read_text())


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The challenge metric as a loss: BCE per class weighted 2:1:..:1, divided by the weight sum."""
    w = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (bce * w).sum(dim=-1).mean() / w.sum()


def multi_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 1: BCE summed over the six classes (all weighted 1), averaged over the samples."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return bce.sum(dim=-1).mean()


LOSSES = {"eq1": multi_bce, "weighted": weighted_bce}


def loss_function(opts: TrainOptions):  # -> Callable[[Tensor, Tensor], Tensor]
    if opts.loss not in LOSSES:
        raise TrainingError(f"unknown loss {opts.loss!r}; use {' or '.join(LOSSES)}")
    return LOSSES[opts.loss]


def _check_config(state: dict[str, Any], opts: TrainOptions, stage: str) -> None:
    try:  # through from_dict: states saved before a config field existed read with its default
        same = ModelConfig.from_dict(state.get("config") or {}) == opts.config
    except (TypeError, ValueError, KeyError):
        same = False
    if not same:
        raise TrainingError(f"{opts.work / stage}: was started with another model config; use a new --work "
                            f"folder or delete {opts.work / stage} to restart that stage")


# ------------------------------------------------------------------------------------------------ stage 1


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
    state = _load_state(path)
    if state is not None:
        _check_config(state, opts, "cnn")
        if state.get("done") and int(state["epoch"]) >= opts.cnn_epochs:
            _log(opts, f"stage cnn: finished earlier ({path}); skipped")
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
        _log(opts, f"stage cnn: resuming at epoch {epoch + 1}, step {step}")

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
        _atomic_save({
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
            _log(opts, f"cnn epoch {epoch}: train loss {running:.4f}, val slice log loss "
                       f"{metrics['slice']['log_loss']:.4f}, "
                       f"val scan AUC(any) {history[-1]['val_scan_auc_any']:.3f}")
        save(done=epoch >= opts.cnn_epochs)
    state = _load_state(path)
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


# ------------------------------------------------------------------------------------------------ stage 2


def stage_features(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    folder = opts.work / "features"
    index_path = folder / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    cnn_state = _load_state(opts.work / "cnn" / "state.pt")
    if cnn_state is None or not cnn_state.get("done"):
        raise TrainingError("stage features needs a finished cnn stage; run the cnn stage first")
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("done") and index.get("cnn_run") == cnn_state["run_id"]:
            _log(opts, f"stage features: finished earlier ({folder}); skipped")
            return index
        _log(opts, "stage features: the CNN changed since the features were extracted; extracting again")
    device = resolve_device(opts.device)
    cnn = build_cnn(opts)
    cnn.load_state_dict(cnn_state["model"])
    cnn.to(device).eval()
    folder.mkdir(parents=True, exist_ok=True)
    scan_ids = [sid for split in ("train", "val", "test") for sid in splits.get(split, [])]
    total = sum(store.scans[s].n_slices for s in scan_ids)
    dim = opts.config.feature_dim
    raw = np.lib.format.open_memmap(folder / "raw.npy", mode="w+", dtype=np.float16, shape=(total, dim))
    logits_all = np.zeros((total, len(CLASSES)), dtype=np.float32)
    offsets: dict[str, list[int]] = {}
    pos = 0
    for sid in progress(scan_ids, desc="extracting features", enabled=opts.verbose):
        # float32, as the node runs the model: the BiLSTM learns from the features it will be given.
        logits, feats = cnn_outputs(cnn, torch.from_numpy(np.array(store.images(sid))), device, amp=False,
                                    neighbours=opts.config.neighbours)
        n = logits.shape[0]
        raw[pos:pos + n] = feats.numpy().astype(np.float16)
        logits_all[pos:pos + n] = logits.numpy()
        offsets[sid] = [pos, n]
        pos += n
    raw.flush()
    np.save(folder / "logits.npy", logits_all)

    from ihd_node.model.selection import fit_selector

    train_rows = np.concatenate([np.arange(offsets[s][0], offsets[s][0] + offsets[s][1])
                                 for s in splits["train"]])
    rng = np.random.default_rng(opts.seed)
    if len(train_rows) > opts.pca_samples:
        train_rows = np.sort(rng.choice(train_rows, size=opts.pca_samples, replace=False))
    head_weight = cnn.head.weight.detach().cpu().numpy()
    _log(opts, f"fitting {opts.config.selector} selector {dim} -> {opts.config.selected_dim} on "
               f"{len(train_rows)} vectors")
    selector = fit_selector(opts.config.selector, np.asarray(raw[train_rows], dtype=np.float32),
                            opts.config.selected_dim, head_weight, seed=opts.seed,
                            weight_reading=opts.weight_reading)
    selected = np.zeros((total, opts.config.selected_dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, total, 8192):
            chunk = torch.from_numpy(np.asarray(raw[start:start + 8192], dtype=np.float32))
            selected[start:start + 8192] = selector(chunk).numpy()
    np.save(folder / "selected.npy", selected)
    _atomic_save({"kind": selector.kind, "state": selector.state_dict()}, folder / "selector.pt")
    index = {"done": True, "config": opts.config.to_dict(), "cnn_run": cnn_state["run_id"],
             "run_id": uuid.uuid4().hex, "offsets": offsets, "total": total}
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return index


def load_selector(opts: TrainOptions) -> torch.nn.Module:
    from ihd_node.model.selection import build_selector

    data = _load_state(opts.work / "features" / "selector.pt")
    if data is None:
        raise TrainingError("no fitted selector; run the features stage first")
    selector = build_selector(opts.config.selector, opts.config.feature_dim, opts.config.selected_dim)
    selector.load_state_dict(data["state"])
    return selector


# ------------------------------------------------------------------------------------------------ stage 3


BILSTM_FEATURES = ("in_sample", "oof")


def features_folder(opts: TrainOptions) -> Path:
    """Where the BiLSTM's training inputs live: features/ (in-sample, the paper) or oof/features/."""
    return opts.work / ("oof/features" if opts.bilstm_features == "oof" else "features")


def sequence_folder(opts: TrainOptions) -> Path:
    """The BiLSTM's state; the out-of-fold run keeps its own, so both can share one CNN and work folder."""
    return opts.work / ("oof/sequence" if opts.bilstm_features == "oof" else "sequence")


class ScanFeatures:
    """Precomputed per-scan inputs of the sequence model: selected features, CNN probabilities, labels."""

    def __init__(self, opts: TrainOptions, store: ScanStore) -> None:
        folder = features_folder(opts)
        index = json.loads((folder / "index.json").read_text())
        self.offsets: dict[str, list[int]] = index["offsets"]
        self.selected = np.load(folder / "selected.npy", mmap_mode="r")
        self.logits = np.load(folder / "logits.npy", mmap_mode="r")
        self.store = store

    def get(self, sid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, n = self.offsets[sid]
        feats = torch.from_numpy(np.array(self.selected[start:start + n]))
        probs = torch.sigmoid(torch.from_numpy(np.array(self.logits[start:start + n])))
        return feats, probs, torch.from_numpy(self.store.labels(sid))


def build_sequence(opts: TrainOptions) -> torch.nn.Module:
    from ihd_node.model.sequence import SequenceHead

    c = opts.config
    torch.manual_seed(opts.seed + 1)
    return SequenceHead(c.selected_dim, c.lstm_hidden, c.lstm_layers, c.bidirectional, c.dropout,
                        c.concat_cnn_probs, num_classes=c.num_classes)


def _pad(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([b[0].shape[0] for b in batch])
    t = int(lengths.max())

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, t - x.shape[0]))

    return (torch.stack([pad(b[0]) for b in batch]), torch.stack([pad(b[1]) for b in batch]),
            torch.stack([pad(b[2]) for b in batch]), lengths)


def stage_sequence(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    path = sequence_folder(opts) / "state.pt"
    state = _load_state(path)
    if not (features_folder(opts) / "index.json").is_file():
        raise TrainingError(f"stage sequence needs {features_folder(opts)}; run the features stage first")
    features_run = json.loads((features_folder(opts) / "index.json").read_text())["run_id"]
    if state is not None:
        _check_config(state, opts, "sequence")
        if state.get("features_run") != features_run:
            _log(opts, "stage sequence: the features changed since it was trained; training it again")
            state = None
        elif state.get("done") and int(state["epoch"]) >= opts.seq_epochs:
            _log(opts, f"stage sequence: finished earlier ({path}); skipped")
            return state
    device = resolve_device(opts.device)
    model = build_sequence(opts).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=opts.seq_lr * opts.lr_scale)
    epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        epoch, history = int(state["epoch"]), list(state.get("history", []))
        _log(opts, f"stage sequence: resuming at epoch {epoch + 1}")
    data = ScanFeatures(opts, store)
    train_ids = list(splits["train"])
    criterion = loss_function(opts)

    def save(done: bool) -> None:
        _atomic_save({"config": opts.config.to_dict(), "options": opts.jsonable(), "epoch": epoch,
                      "done": done, "features_run": features_run, "history": history,
                      "model": model.state_dict(), "optimizer": optimiser.state_dict()}, path)

    while epoch < opts.seq_epochs:
        order = np.random.default_rng([opts.seed, 7, epoch]).permutation(len(train_ids))
        model.train()
        running, seen = 0.0, 0
        batches = [order[i:i + opts.seq_batch] for i in range(0, len(order), opts.seq_batch)]
        bar = progress(batches, desc=f"sequence epoch {epoch + 1}/{opts.seq_epochs}", enabled=opts.verbose)
        for idx in bar:
            feats, probs, labels, lengths = _pad([data.get(train_ids[i]) for i in idx])
            feats, probs, labels = feats.to(device), probs.to(device), labels.to(device)
            logits = model(feats, probs, lengths if len(idx) > 1 else None)
            mask = torch.arange(feats.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
            loss = criterion(logits[mask], labels[mask])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if opts.seq_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.seq_clip)
            optimiser.step()
            running = 0.95 * running + 0.05 * loss.item() if seen else loss.item()
            seen += 1
            bar.set_postfix(loss=running)
        history.append({"epoch": epoch + 1, "train_loss": running})
        epoch += 1
        if splits.get("val"):
            metrics = evaluate_sequence(model, data, splits["val"], device)
            history[-1]["val_slice_log_loss"] = metrics["slice"]["log_loss"]
            _log(opts, f"sequence epoch {epoch}: train loss {running:.4f}, val slice log loss "
                       f"{metrics['slice']['log_loss']:.4f}, val scan AUC(any) "
                       f"{metrics['scan']['classes']['any']['auc']:.3f}")
        save(done=epoch >= opts.seq_epochs)
    state = _load_state(path)
    assert state is not None
    return state


@torch.no_grad()
def sequence_probabilities(model: torch.nn.Module, data: ScanFeatures, scan_ids: Sequence[str],
                           device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    model.eval()
    labels, probs = [], []
    for sid in scan_ids:
        feats, cnn_probs, lab = data.get(sid)
        logits = model(feats[None].to(device), cnn_probs[None].to(device))[0]
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(lab.numpy())
    return labels, probs


def evaluate_sequence(model: torch.nn.Module, data: ScanFeatures, scan_ids: Sequence[str],
                      device: torch.device, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    labels, probs = sequence_probabilities(model, data, scan_ids, device)
    model.train()
    return evaluate_scans(labels, probs, thresholds)


# ------------------------------------------------------------------------------------------------ export


def export_checkpoint(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]],
                      out: Path | None = None) -> Path:
    """Assemble CNN + selector + BiLSTM into one checkpoint, thresholds chosen on the validation split."""
    from ihd_node.model.checkpoint import save_checkpoint
    from ihd_node.model.network import IhdModel

    cnn_state = _load_state(opts.work / "cnn" / "state.pt")
    seq_state = _load_state(sequence_folder(opts) / "state.pt")
    if not (cnn_state and cnn_state.get("done") and seq_state and seq_state.get("done")):
        raise TrainingError("export needs finished cnn, features and sequence stages")
    model = IhdModel(opts.config)
    model.cnn.load_state_dict(cnn_state["model"])
    model.selector.load_state_dict(load_selector(opts).state_dict())
    model.sequence.load_state_dict(seq_state["model"])
    model.eval()

    device = resolve_device(opts.device)
    data = ScanFeatures(opts, store)
    val = splits.get("val") or splits["train"]
    seq = model.sequence.to(device)
    labels, probs = sequence_probabilities(seq, data, val, device)
    scan_labels = np.stack([y.max(axis=0) for y in labels])
    scan_probs = np.stack([p.max(axis=0) for p in probs])
    thresholds = choose_thresholds(scan_labels, scan_probs, opts.threshold_method)
    val_metrics = evaluate_scans(labels, probs, thresholds)
    _log(opts, "validation split, chosen thresholds:\n" + format_metrics(val_metrics))
    model.to("cpu")
    provenance = {
        "data": opts.trained_on or f"scans in {opts.work / 'cache'}",
        "date": time.strftime("%Y-%m-%d"),
        "splits": {k: len(v) for k, v in splits.items()},
        "training": {k: v for k, v in opts.jsonable().items() if k not in ("config", "verbose")},
        "history": {"cnn": cnn_state.get("history", []), "sequence": seq_state.get("history", [])},
        "threshold_method": f"{opts.threshold_method} on the validation split, scan level",
        "metrics": {"validation": jsonable(val_metrics)},
    }
    if opts.bilstm_features == "oof":
        from training.stages.oof import oof_provenance

        provenance["bilstm_features"] = oof_provenance(opts, seq, data, val, thresholds, device)
    path = out or opts.work / ("model-oof.pt" if opts.bilstm_features == "oof" else "model.pt")
    save_checkpoint(path, model, thresholds=thresholds, name=opts.name, version=opts.version,
                    provenance=provenance)
    _log(opts, f"checkpoint written: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def run_stages(opts: TrainOptions, stages: Sequence[str] = STAGES, out: Path | None = None) -> Path | None:
    """Run the asked stages in order (finished ones are skipped), then export when all are done."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if opts.bilstm_features not in BILSTM_FEATURES:
        raise TrainingError(f"unknown --bilstm-features {opts.bilstm_features!r}; use "
                            f"{' or '.join(BILSTM_FEATURES)}")
    if opts.bilstm_features == "oof" and opts.folds < 2:
        raise TrainingError(f"--folds {opts.folds}: out-of-fold features need at least 2 folds")
    torch.manual_seed(opts.seed)
    store = ScanStore(opts.work / "cache")
    if store.size != opts.config.input_size:
        raise TrainingError(f"the cache holds {store.size}px images but the model wants "
                            f"{opts.config.input_size}px; run prepare again with --input-size "
                            f"{opts.config.input_size}")
    splits = load_splits(opts.work)
    if "cnn" in stages:
        stage_cnn(opts, store, splits)
    if "features" in stages:
        stage_features(opts, store, splits)
        if opts.bilstm_features == "oof":
            from training.stages.oof import stage_oof

            stage_oof(opts, store, splits)
    if "sequence" in stages:
        stage_sequence(opts, store, splits)
        return export_checkpoint(opts, store, splits, out)
    return None
