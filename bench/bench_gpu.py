"""The `paper` preset on an accelerator: end-to-end model time of one study and CNN training throughput.

1. Model time per study, on the node's own path: Predictor.predict (ihd_node/model/pipeline.py) on a --slices
   phantom head (HU array in host memory, 512x512): preprocessing on the device, CNN in batches, PCA +
   BiLSTM, sigmoid, then Grad-CAM of the decision (the BiLSTM's logit back through the selector into the
   CNN's CAM layer, as the node's default `explain: decision`) for --cam-slices slices, every class of each,
   each map kept inside the slice's intracranial mask, all results back on the host. As the node runs it:
   fp32, channels-last; cudnn.benchmark on; warmed up first, then the median of --repeats.
   Target on an H100/H200: < 150 ms.
2. Training throughput of the CNN stage: slices/s at --train-size px with AMP (bf16 autocast), AdamW,
   batch --train-batch, channels-last; warmed up, then --train-steps timed. Target: >= 800 slices/s.
The weights are random (only speed is measured): all thresholds are 0 so every slice is positive and the
--cam-slices slices get maps. `--device cpu --tiny` runs the same code at toy sizes
(tests/test_bench_gpu.py runs it so that this script cannot rot while no GPU is at hand).

    bench/gpu.sh [--device cuda] [--slices 40] [--repeats 5] [--train-batch 64] [--train-steps 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import get_preset, tiny_config
from ihd_node.sim.phantom import make_series

TARGET_STUDY_MS = 150.0
TARGET_TRAIN_SLICES_S = 800.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"CPU: {model}, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def study_seconds(predictor: Predictor, hu: np.ndarray, pixel_spacing: float, cam_slices: int) -> float:
    """One study end to end as the node analyses it (host HU in, host probabilities and heatmaps out)."""
    sync(predictor.device)
    t0 = time.perf_counter()
    prediction = predictor.predict(hu, explain=True, max_cam_slices=cam_slices, pixel_spacing_mm=pixel_spacing)
    sync(predictor.device)
    seconds = time.perf_counter() - t0
    assert prediction.explained == "decision" and len(prediction.heatmaps) == cam_slices * len(CLASSES)
    assert np.isfinite(prediction.slice_probabilities).all()
    return seconds


def train_slices_per_second(model: IhdModel, device: torch.device, size: int, batch: int, steps: int,
                            bf16: bool) -> float:
    cnn = model.cnn.train()
    opt = torch.optim.AdamW(cnn.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, len(CLASSES), device=device) > 0.8).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, _ = cnn(x)
        loss_fn(logits.float(), y).backward()
        opt.step()

    for _ in range(3):  # cudnn.benchmark picks its kernels here
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    cnn.eval()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--cam-slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a tiny resnet18, 64 px) for a smoke test")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu (and --tiny for a quick check)")
        return 2
    if args.tiny:
        config = tiny_config("resnet18", input_size=64)
        args.slices, args.cam_slices, args.repeats = 6, 2, 2
        args.train_size, args.train_batch, args.train_steps = 64, 4, 2
    else:
        config = get_preset(args.preset)
    torch.backends.cudnn.benchmark = True
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    model = IhdModel(config)
    predictor = Predictor.from_model(model, dict.fromkeys(CLASSES, 0.0), "random", "0", device=device,
                                     explain="decision")
    # A phantom head (skull, brain, a bleed): the intracranial masks are made as for a real series.
    head = make_series(7, subtypes=["subdural"], n_slices=args.slices, size=512,
                       slice_spacing=min(10.0, 190.0 / max(args.slices - 1, 1)))
    hu = head.hu

    print(f"device: {device_name(device)}; torch {torch.__version__}; node path (Predictor.predict, fp32, "
          f"decision Grad-CAM); training bf16 autocast {'on' if bf16 else 'off'}")
    for _ in range(3):  # warm: kernels, cudnn autotuning, allocator
        study_seconds(predictor, hu, head.pixel_spacing, args.cam_slices)
    times = [study_seconds(predictor, hu, head.pixel_spacing, args.cam_slices) for _ in range(args.repeats)]
    ms = 1000 * statistics.median(times)
    name = "tiny resnet18" if args.tiny else args.preset
    print(f"  {name}: one {args.slices}-slice study end to end with Grad-CAM for {args.cam_slices} slices x "
          f"{len(CLASSES)} classes: {ms:.1f} ms (median of {args.repeats}); target < {TARGET_STUDY_MS:.0f} ms "
          f"on an H100/H200: ratio {ms / TARGET_STUDY_MS:.2f}")
    rate = train_slices_per_second(model, device, args.train_size, args.train_batch, args.train_steps, bf16)
    print(f"  {name}: CNN training {rate:.1f} slices/s at {args.train_size} px, batch {args.train_batch}, "
          f"{'bf16 AMP' if bf16 else 'fp32'}; target >= {TARGET_TRAIN_SLICES_S:.0f} slices/s: ratio "
          f"{rate / TARGET_TRAIN_SLICES_S:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
