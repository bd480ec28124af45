"""The model on this machine's CPU: eager fp32 vs optimized paths in the same run, Grad-CAM's cost, and
peak memory for long series.

1. Per-slice milliseconds of the CNN+sequence forward pass for `compact` (the shipped default model) and
   `paper` (ResNeXt-101 32x8d, random weights), interleaved per repeat so noise hits all paths alike:
     eager     what the node ran before: fp32, channels-last, inference_mode
     fused     conv+batch-norm folded into the convolutions (torch.fx), fp32, channels-last: the node's
               default since issue 11 (ihd_node.model.optimize)
     jit       TorchScript trace + freeze (folds conv-bn, pre-packs oneDNN weights), fp32
     bf16      eager under CPU bf16 autocast (only where the CPU has bf16 instructions)
     compile   torch.compile (inductor), fp32; with --compile only (minutes of compiling on 2 cores)
   each with the largest difference of its per-slice probabilities from eager fp32.
2. Grad-CAM's cost: a 32-slice series with heatmaps for 16 slices vs the forward pass alone.
3. Peak RSS (VmHWM) of a fresh process analysing a 300- and a 600-slice 512x512 series with the default
   model and Grad-CAM (each in its own subprocess, so the figure is its own).

    .venv/bin/python bench/bench_model_cpu.py [--threads 2] [--slices 16] [--repeats 3] [--compile] [--no-rss]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ihd_node.model.optimize import cpu_has_bf16, fuse_conv_bn
from ihd_node.model.pipeline import Predictor
from ihd_node.model.preprocess import prepare_slices

RSS_CHILD = r"""
import resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from ihd_node.model.pipeline import Predictor
n = int(sys.argv[1])
p = Predictor.load("default", device="cpu")
rng = np.random.default_rng(0)
hu = rng.normal(40, 20, (n, 512, 512)).astype(np.float32)  # the HU volume as the loader hands it over
t = time.perf_counter()
pred = p.predict(hu, explain=True, max_cam_slices=16)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hu.nbytes / 2**20)
"""


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_preset(preset: str, hu: np.ndarray, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    """Lines for one preset: each path's ms/slice, speed-up and largest difference (and Grad-CAM's cost)."""
    lines: list[str] = []
    if preset == "compact":
        predictor = Predictor.load("default", device="cpu")
        label = f"compact ({predictor.name} {predictor.version}, trained)"
    else:
        from ihd_node.classes import CLASSES
        from ihd_node.model.network import IhdModel
        from ihd_node.model.presets import get_preset

        torch.manual_seed(0)
        predictor = Predictor.from_model(IhdModel(get_preset(preset)), dict.fromkeys(CLASSES, 0.5),
                                         f"{preset}-random", "0")
        label = f"{preset} (random weights)"
    model, cfg = predictor.model, predictor.config
    x = prepare_slices(hu, cfg.input_size, "cpu", windows=cfg.windows, mean=cfg.mean,
                       std=cfg.std).contiguous(memory_format=torch.channels_last)

    def run(cnn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
            bf16: bool = False) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, feats = cnn(x)
            seq = model.sequence_logits(feats.float().unsqueeze(0), logits.float().unsqueeze(0))[0]
        # The final probabilities and the CNN's own per-slice ones: with random weights (paper) the
        # sequence stage can hide CNN differences, so both are compared.
        return torch.cat([torch.sigmoid(seq.float()), torch.sigmoid(logits.float())], dim=1)

    paths: dict[str, Callable[[], torch.Tensor]] = {"eager": lambda: run(model.cnn)}
    fused = fuse_conv_bn(model.cnn).to(memory_format=torch.channels_last)
    paths["fused"] = lambda: run(fused)
    with torch.inference_mode():
        traced = torch.jit.freeze(torch.jit.trace(model.cnn.eval(), x[:2], check_trace=False))
    paths["jit"] = lambda: run(traced)
    if cpu_has_bf16():
        paths["bf16"] = lambda: run(model.cnn, bf16=True)
    if args.compile:
        compiled = torch.compile(fused)
        paths["compile"] = lambda: run(compiled)
    for fn in paths.values():  # warm-up: kernel choice, TorchScript profiling runs, compiling
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            seconds, outs[name] = timed(fn)
            times[name].append(seconds / args.slices)
    eager = statistics.median(times["eager"])
    lines.append(f"  {label}:")
    for name in paths:
        t = statistics.median(times[name])
        diff = float((outs[name] - outs["eager"]).abs().max())
        lines.append(f"    {name:8s} {1000 * t:8.1f} ms/slice  speed-up x{eager / t:4.2f}  "
                     f"largest probability difference (final and CNN) {diff:.1e}")
    if preset == "compact":  # Grad-CAM's cost on the default model, as the node runs it
        series = rng.normal(40, 30, (32, 512, 512)).astype(np.float32)
        predictor.thresholds = dict.fromkeys(predictor.thresholds, 0.0)  # every slice "positive"
        predictor.predict(series, explain=True, max_cam_slices=16)
        fwd = statistics.median(timed(lambda: predictor.predict(series, explain=False))[0]
                                for _ in range(args.repeats))
        cam = statistics.median(timed(lambda: predictor.predict(series, explain=True, max_cam_slices=16))[0]
                                for _ in range(args.repeats))
        lines.append(f"    Grad-CAM: 32 slices forward {fwd:.3f} s; with heatmaps for 16 slices x 6 classes "
                     f"{cam:.3f} s: Grad-CAM costs x{(cam - fwd) / fwd:.2f} the forward pass")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=16, help="slices per timed pass (one CNN batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    parser.add_argument("--no-rss", action="store_true", help="skip the 300/600-slice memory runs")
    parser.add_argument("--presets", default="compact,paper")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated; measured all the same
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 30, (args.slices, 512, 512)).astype(np.float32)
    hu[:, 100:140, 200:300] += 40  # something bright, so the probabilities are not all alike

    lines = [f"model on the CPU: {args.threads} torch threads, {args.slices} slices 512x512 per pass, median of "
             f"{args.repeats}; bf16 instructions: {'yes' if cpu_has_bf16() else 'no'}"]
    for preset in args.presets.split(","):
        lines += bench_preset(preset, hu, args, rng)
    if not args.no_rss:
        lines.append("  peak RSS of a fresh process, default model, Grad-CAM for 16 slices:")
        for n in (300, 600):
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(n), str(args.threads)], capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode:
                lines.append(f"    {n} slices: failed: {out.stderr.strip()[-500:]}")
                continue
            seconds, peak, volume_mb = (float(v) for v in out.stdout.split()[-3:])
            lines.append(f"    {n} slices: peak RSS {peak:6.0f} MB (the HU volume alone {volume_mb:.0f} MB); "
                         f"predict + Grad-CAM {seconds:.1f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
