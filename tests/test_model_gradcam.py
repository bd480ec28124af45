"""Grad-CAM: maps only for the requested pairs, in the slice grid, batched == one by one == plain autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ihd_node.model.cnn import SliceCNN
from ihd_node.model.gradcam import grad_cam, lesion_hits, peak_in_mask

PAIRS = [(0, 1), (2, 0), (2, 3), (4, 5), (1, 0)]


def _cnn(name: str = "resnet18") -> SliceCNN:
    torch.manual_seed(0)
    return SliceCNN(name).eval()


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _reference(cnn: SliceCNN, image: torch.Tensor, cls: int, out_size: tuple[int, int]) -> torch.Tensor:
    """Textbook Grad-CAM with a full backward pass through the whole network, one image at a time."""
    store = {}
    handle = cnn.cam_layer.register_forward_hook(lambda m, i, o: store.update(act=o))
    try:
        logits, _ = cnn(image[None])
        act = store["act"]
        (grad,) = torch.autograd.grad(logits[0, cls], act)
    finally:
        handle.remove()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)[0, 0]
    return cam / cam.max() if cam.max() > 0 else cam


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_maps_match_plain_autograd_and_have_the_slice_shape(name: str) -> None:
    cnn, images = _cnn(name), _images()
    maps = grad_cam(cnn, images, PAIRS, out_size=(100, 80))
    assert maps.shape == (len(PAIRS), 100, 80) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    for k, (img, cls) in enumerate(PAIRS):
        want = _reference(cnn, images[img], cls, (100, 80))
        torch.testing.assert_close(maps[k], want, atol=1e-4, rtol=1e-4)
        assert float(maps[k].max()) in (0.0, pytest.approx(1.0))


def test_batched_equals_one_by_one_and_targets_stay_separate() -> None:
    cnn, images = _cnn(), _images()
    batched = grad_cam(cnn, images, PAIRS, batch_size=16)
    small_batches = grad_cam(cnn, images, PAIRS, batch_size=2)
    singles = torch.stack([grad_cam(cnn, images, [p], batch_size=1)[0] for p in PAIRS])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small_batches, singles, atol=1e-5, rtol=1e-5)
    # Two classes of one slice give two different maps (each its own target).
    assert not torch.allclose(batched[1], batched[2])


def test_only_requested_pairs_and_model_state_is_restored() -> None:
    cnn, images = _cnn(), _images()
    flags = [p.requires_grad for p in cnn.parameters()]
    assert grad_cam(cnn, images, []).shape == (0, 64, 64)
    maps = grad_cam(cnn, images, [(3, 2)])
    assert maps.shape == (1, 64, 64)  # default grid: the network input's
    assert [p.requires_grad for p in cnn.parameters()] == flags and not cnn.training
    assert not cnn.cam_layer._forward_hooks
    assert all(p.grad is None for p in cnn.parameters())


def test_works_from_inference_mode() -> None:
    cnn = _cnn()
    with torch.inference_mode():
        images = _images()
        maps = grad_cam(cnn, images, [(0, 0)], out_size=(32, 32))
    torch.testing.assert_close(maps[0], _reference(cnn, _images()[0], 0, (32, 32)), atol=1e-4, rtol=1e-4)


def test_peak_in_mask_helper() -> None:
    heat = np.zeros((20, 20))
    heat[5, 7] = 1.0
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:8, 7:9] = 1
    assert peak_in_mask(heat, mask)
    mask[:] = 0
    mask[5, 10] = 1
    assert not peak_in_mask(heat, mask) and peak_in_mask(heat, mask, margin=3)
    assert not peak_in_mask(heat, np.zeros((20, 20)))


def test_lesion_hits_reads_phantom_bitmasks() -> None:
    masks = np.zeros((3, 20, 20), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1 << 4  # subdural (SUBTYPES[4]) on slice 0
    masks[1, 10:12, 10:12] = 1 << 0  # epidural on slice 1
    on_sdh, off = np.zeros((20, 20)), np.zeros((20, 20))
    on_sdh[3, 3] = 1.0
    off[18, 18] = 1.0
    heatmaps = {(0, "subdural"): on_sdh, (0, "any"): on_sdh, (1, "epidural"): off, (2, "any"): off,
                (1, "subdural"): on_sdh}
    # (2, any) and (1, subdural) have no such lesion: not judged.
    assert lesion_hits(heatmaps, masks) == (2, 3)


def _forward_keeping(model, images: torch.Tensor, batch: int):
    """The pipeline's forward pass: CAM activations as leaves, per batch; (acts, cnn_logits, features, logits)."""
    from ihd_node.model.gradcam import frozen

    acts = []

    def keep(_m, _i, out):
        leaf = out.detach().requires_grad_(True)
        acts.append(leaf)
        return leaf

    with frozen(model):
        handle = model.cnn.cam_layer.register_forward_hook(keep)
        parts = [model.forward_features(images[i:i + batch]) for i in range(0, images.shape[0], batch)]
        handle.remove()
        cnn_logits, features = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        logits = model.sequence_logits(features[None], cnn_logits[None])[0]
    return acts, cnn_logits, features, logits


@pytest.mark.parametrize("explain", ["decision", "cnn"])
def test_maps_from_kept_activations_equal_the_direct_gradient(explain: str) -> None:
    """Batched pull-back through the CNN tail == each target's own full backward to its slice."""
    from ihd_node.model.gradcam import cams_from_activations
    from ihd_node.model.network import IhdModel
    from ihd_node.model.presets import tiny_config

    torch.manual_seed(0)
    model = IhdModel(tiny_config(backbone="mobilenet_v3_small")).eval()
    torch.nn.init.normal_(model.selector.components, std=0.1)
    images = _images(7)
    acts, cnn_logits, features, logits = _forward_keeping(model, images, batch=3)
    outputs = logits if explain == "decision" else cnn_logits
    targets = [(0, 1), (2, 0), (2, 3), (4, 5), (6, 0), (3, 2)]
    maps = cams_from_activations(acts, (cnn_logits, features), outputs, targets, out_size=(40, 40))
    for k, (index, cls) in enumerate(targets):
        b, row = index // 3, index % 3
        (grad,) = torch.autograd.grad(outputs[index, cls], acts[b], retain_graph=True)
        weights = grad[row].mean(dim=(1, 2), keepdim=True)
        cam = torch.relu((weights * acts[b].detach()[row]).sum(dim=0))[None, None]
        cam = F.interpolate(cam, size=(40, 40), mode="bilinear", align_corners=False)[0, 0]
        want = cam / cam.max() if cam.max() > 0 else cam
        torch.testing.assert_close(maps[k], want, atol=1e-4, rtol=1e-4)
    if explain == "decision":
        # The BiLSTM mixes slices: the decision's map is not the CNN's.
        cnn_maps = cams_from_activations(acts, (cnn_logits, features), cnn_logits, targets, out_size=(40, 40))
        assert not torch.allclose(maps, cnn_maps, atol=1e-3)


def test_mask_heatmap_keeps_only_the_mask_and_rescales() -> None:
    from ihd_node.model.gradcam import mask_heatmap

    heat = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    out = mask_heatmap(heat, mask)
    assert out[~mask].max() == 0 and out[mask].max() == pytest.approx(1.0)
    assert not mask_heatmap(heat, np.zeros((10, 10), bool)).any()
