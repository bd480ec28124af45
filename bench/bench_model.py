"""Model speed on this machine's CPU, measured side by side in one run.

Reports, for a 32-slice 512x512 phantom series read from DICOM files:
  * seconds to analyze it with the shipped default model, with and without Grad-CAM (target: <= 3 s with),
  * per-slice milliseconds of the `paper` preset (ResNeXt-101 32x8d + PCA + BiLSTM, random weights).
Ratios are printed against the target and between the two runs, which are interleaved so that noise from
other work on the machine hits both alike.

    .venv/bin/python bench/bench_model.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import get_preset
from ihd_node.node.analysis import analyze_series
from ihd_node.sim.phantom import make_series, write_series

TARGET_WITH_GRADCAM_S = 3.0


def time_analyze(files: list[Path], predictor: Predictor, explain: bool) -> tuple[float, int]:
    """Seconds to analyze the series from its files, and how many Grad-CAM heatmaps it made."""
    started = time.perf_counter()
    result = analyze_series(files, predictor, explain=explain)
    elapsed = time.perf_counter() - started
    assert result.volume.n_slices == len(files)
    return elapsed, len(result.prediction.heatmaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper-slices", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        # A positive series, so Grad-CAM has (slice, class) pairs to explain.
        series = make_series(7, subtypes=["subdural", "intraparenchymal"], n_slices=32, size=512)
        files = write_series(series, Path(tmp))
        predictor = Predictor.load("default", device="cpu")
        time_analyze(files, predictor, True)  # warm-up: first-call allocations and file cache
        with_cam, without_cam = [], []
        for _ in range(args.repeats):
            seconds, n_maps = time_analyze(files, predictor, True)
            with_cam.append(seconds)
            without_cam.append(time_analyze(files, predictor, False)[0])

    w, wo = statistics.median(with_cam), statistics.median(without_cam)
    print(f"default model ({predictor.identity.name} {predictor.identity.version}), 32 slices 512x512, "
          f"{args.threads} threads, median of {args.repeats}:")
    print(f"  analyze with Grad-CAM    {w:6.3f} s  ({n_maps} heatmaps)  target {TARGET_WITH_GRADCAM_S:.1f} s  "
          f"ratio to target {w / TARGET_WITH_GRADCAM_S:.2f}  {'OK' if w <= TARGET_WITH_GRADCAM_S else 'OVER'}")
    print(f"  analyze without Grad-CAM {wo:6.3f} s  Grad-CAM costs x{w / wo:.2f}")

    paper = IhdModel(get_preset("paper")).eval()
    paper_predictor = Predictor.from_model(paper, {c: 0.5 for c in paper.config.classes}, "paper-random", "0")
    hu = series.hu[: args.paper_slices].astype(np.float32)
    paper_predictor.predict(hu, explain=False)  # warm-up
    paper_times = []
    compact_times = []
    for _ in range(max(2, args.repeats // 2)):
        t0 = time.perf_counter()
        paper_predictor.predict(hu, explain=False)
        paper_times.append((time.perf_counter() - t0) / len(hu))
        t0 = time.perf_counter()
        predictor.predict(hu, explain=False)
        compact_times.append((time.perf_counter() - t0) / len(hu))
    p, c = statistics.median(paper_times), statistics.median(compact_times)
    print(f"per-slice inference, {args.paper_slices} slices 512x512 (resized to 256), no Grad-CAM:")
    print(f"  paper preset   {p * 1000:8.1f} ms/slice (ResNeXt-101 32x8d; the paper reports 36 ms on a GPU)")
    print(f"  default model  {c * 1000:8.1f} ms/slice  paper/default ratio x{p / c:.1f}")


if __name__ == "__main__":
    main()
