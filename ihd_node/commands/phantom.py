"""`ihd-node phantom OUTDIR`: write synthetic head-CT series for tests, the demo and training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ihd_node.errors import UserError
from ihd_node.sim.phantom.make import choose_subtypes, make_series
from ihd_node.sim.phantom.write import describe, write_rsna_layout, write_series


def phantom_command(args: argparse.Namespace) -> int:
    """`ihd-node phantom OUTDIR`: write args.series series with seeds seed, seed+1, ..."""
    if args.series < 1:
        raise UserError(f"--series must be at least 1, got {args.series}")
    subtypes = args.subtypes
    if subtypes is not None:
        choose_subtypes(np.random.default_rng(0), subtypes)  # names checked before anything is written
    out = Path(args.outdir)
    kw: dict[str, Any] = {"subtypes": subtypes, "n_slices": args.slices, "size": args.size}
    if getattr(args, "randomize", False):
        kw["randomize"] = True
    if args.rsna_layout:
        csv_path = write_rsna_layout(out, args.series, args.seed,
                                     on_series=lambda s: print(describe(s), flush=True), **kw)
        print(f"wrote {out / 'stage_2_train'} and {csv_path}")
        return 0
    for i in range(args.series):
        s = make_series(args.seed + i, **kw)
        folder = out / f"phantom_{args.seed + i}"
        write_series(s, folder)
        print(f"{describe(s)} -> {folder}")
    return 0
