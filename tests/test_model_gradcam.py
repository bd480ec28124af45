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
