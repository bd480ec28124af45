"""Cost of the 2.5D input option against the paper's single-slice input, measured side by side.

For each input (single slice: 3 channels; 2.5D with k neighbours each side: 3 (2k+1) channels) and the
same backbone, interleaved per repeat so load on the machine hits both alike:
  train step  one CNN training step (augmentation, forward, Eq. 1 loss, backward, Adam) on a batch
              drawn from a cached scan through training's SliceDataset (memory-mapped uint8 cache);
              also the part spent reading and augmenting the batch (3x the channels for k = 1)
  stem conv   the first convolution alone on that batch (the only layer that widens), forward
  node        the node's Predictor on a series (forward pass, no heatmaps), per slice
Prints milliseconds and the 2.5D / single ratio. The stem convolution, the data read and the
augmentation widen; the rest of the network does not, so the ratio shrinks as the backbone grows.

    .venv/bin/python bench/bench_input_25d.py [--backbone mobilenet_v3_small] [--size 256] [--batch 32]
                                              [--neighbours 1] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # training/ is not an installed package

from ihd_node.classes import CLASSES  # noqa: E402
from ihd_node.model.cnn import first_conv  # noqa: E402
from ihd_node.model.network import IhdModel  # noqa: E402
from ihd_node.model.pipeline import Predictor  # noqa: E402
from ihd_node.model.presets import BACKBONE_FEATURE_DIMS, get_preset  # noqa: E402
from training.augment import AugmentConfig, Augmenter  # noqa: E402
from training.data import ScanStore, SliceDataset, write_cached_scan  # noqa: E402
from training.losses import multi_bce  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--neighbours", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = get_preset("compact").with_changes(backbone=args.backbone, input_size=args.size,
                                             feature_dim=BACKBONE_FEATURE_DIMS[args.backbone])
    configs = {"single": base, "2.5d": base.with_changes(neighbours=args.neighbours)}
    rng = np.random.default_rng(0)
    hu = rng.normal(30, 20, (40, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cached = write_cached_scan(Path(tmp), "scan", "scan", hu, [str(i) for i in range(len(hu))],
                                   np.zeros((len(hu), 6)), args.size)
        store = ScanStore(Path(tmp), [cached])
        runs = {}
        for name, config in configs.items():
            torch.manual_seed(0)
            model = IhdModel(config)
            runs[name] = {
                "model": model,
                "opt": torch.optim.Adam(model.cnn.parameters(), lr=1e-4),
                "data": SliceDataset(store, ["scan"], neighbours=config.neighbours),
                "predictor": Predictor.from_model(IhdModel(config), dict.fromkeys(CLASSES, 0.5), name, "0"),
                "stem_conv": first_conv(model.cnn.backbone)[2],
                "train": [], "input": [], "stem": [], "node": [],
            }
        augmenter = Augmenter(AugmentConfig(), generator=torch.Generator().manual_seed(0))
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for _name, run in runs.items():
                idx = rng.integers(0, len(hu), args.batch)
                started = time.perf_counter()
                images = torch.stack([run["data"][int(i)][0] for i in idx])
                x = augmenter(images)
                prepared = time.perf_counter()
                logits, _ = run["model"].cnn(x)
                loss = multi_bce(logits, torch.zeros_like(logits))
                run["opt"].zero_grad()
                loss.backward()
                run["opt"].step()
                train_s = time.perf_counter() - started
                input_s = prepared - started
                with torch.inference_mode():
                    started = time.perf_counter()
                    run["stem_conv"](x)
                    stem_s = time.perf_counter() - started
                started = time.perf_counter()
                run["predictor"].predict(hu[:16], explain=False)
                node_s = time.perf_counter() - started
                if repeat:
                    run["train"].append(train_s * 1000)
                    run["input"].append(input_s * 1000)
                    run["stem"].append(stem_s * 1000)
                    run["node"].append(node_s * 1000 / 16)
    print(f"{args.backbone} at {args.size}px, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeats} interleaved repeats; 2.5D = {args.neighbours} neighbour(s) each side")
    single, wide = runs["single"], runs["2.5d"]
    for key, label in (("train", "train step (ms per batch)"), ("input", "  of which read + augment"),
                       ("stem", "stem conv forward (ms/batch)"),
                       ("node", "node forward (ms per slice)")):
        a, b = statistics.median(single[key]), statistics.median(wide[key])
        print(f"  {label:30s} single {a:8.1f}   2.5d {b:8.1f}   ratio 2.5d/single {b / a:.2f}")


if __name__ == "__main__":
    main()
