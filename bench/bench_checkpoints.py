"""Two or more checkpoints side by side on this CPU: the model's part of a 32-slice series' time to result
(preprocessing, CNN + sequence, calibration, Grad-CAM for the positive slices, as `Predictor.predict` does
for the node), interleaved per repeat so load on a shared machine hits every checkpoint alike.

    .venv/bin/python bench/bench_checkpoints.py OLD.pt default [--slices 32] [--repeats 5] [--threads 2]

The series is a phantom with an intraventricular and an intraparenchymal bleed at 512 x 512, so every
model computes heatmaps for its positive slices (capped at 16, the node's default max_secondary_captures).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ihd_node.model.pipeline import Predictor
from ihd_node.sim.phantom import make_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files, or 'default'")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    series = make_series(4242, subtypes=["intraventricular", "intraparenchymal"], n_slices=args.slices)
    predictors = [Predictor.load(c, device="cpu") for c in args.checkpoints]
    for p in predictors:  # warm-up: first calls allocate and pick kernels
        p.predict(series.hu, explain=True, max_cam_slices=16)
    times: list[list[float]] = [[] for _ in predictors]
    for _ in range(args.repeats):
        for k, p in enumerate(predictors):
            t = time.perf_counter()
            p.predict(series.hu, explain=True, max_cam_slices=16)
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times[0])
    for c, p, t in zip(args.checkpoints, predictors, times, strict=True):
        med = statistics.median(t)
        print(f"{c} ({p.name} {p.version}): median {med:.2f} s for {args.slices} slices "
              f"(min {min(t):.2f}, max {max(t):.2f}, {len(t)} runs), {med / base:.2f}x the first")


if __name__ == "__main__":
    main()
