"""Time to result of the whole node: from the PACS finishing its send to the SR and SCs stored in the PACS.

A 28-slice 512x512 phantom study is sent over C-STORE to a node running the shipped default model on this
machine's CPU; the results go back to a receiving PACS on loopback. Target: at most quiet_seconds + 5 s.
Each run is split into the quiet period the node waits by design and the node's own work after it, and
the ratio to the target is printed.

    .venv/bin/python bench/bench_node.py [--studies 3] [--quiet 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ihd_node.config import default_config
from ihd_node.dicom.mini_pacs import MiniPACS, free_port, send_files
from ihd_node.phantom import make_series, write_series
from ihd_node.service import Node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--slices", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = args.quiet + 5.0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pacs = MiniPACS(root / "pacs", ae_title="PACS").start()
        port = free_port()
        config = default_config(root / "node", node={"host": "127.0.0.1", "port": port},
                                series={"quiet_seconds": args.quiet, "check_coverage": False},
                                destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                               "port": pacs.port}])
        node = Node(config).start()
        results = []
        try:
            for k in range(args.studies):
                series = make_series(300 + k, subtypes=["subdural"] if k % 2 == 0 else [], n_slices=args.slices)
                files = write_series(series, root / f"study{k}")
                send_files(files, host="127.0.0.1", port=port, called_aet=config.node.ae_title,
                           calling_aet="PACS")
                sent = time.time()
                deadline = sent + 120
                while time.time() < deadline:
                    row = node.db.get_series(series.series_instance_uid)
                    if row is not None and row.state in ("delivered", "failed", "ignored"):
                        break
                    time.sleep(0.05)
                objects = pacs.objects(series.study_instance_uid)
                assert row is not None and row.state == "delivered" and objects, f"study {k}: {row}"
                done = max(o.received_at for o in objects)
                results.append(done - sent)
                print(f"study {k}: {len(files)} slices, {len(objects)} result objects, "
                      f"time to result {done - sent:5.2f} s (quiet period {args.quiet:.1f} s + node work "
                      f"{done - sent - args.quiet:5.2f} s)")
        finally:
            node.stop()
            pacs.stop()
    worst, median = max(results), statistics.median(results)
    print(f"time to result: median {median:.2f} s, worst {worst:.2f} s; target quiet_seconds + 5 = {target:.1f} s; "
          f"worst/target ratio {worst / target:.2f} {'OK' if worst <= target else 'OVER'}")


if __name__ == "__main__":
    main()
