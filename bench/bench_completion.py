"""What the completion evidence costs (issue 13, done-when (d)).

1. Time to result of a normal send — one association, the whole series, the PACS releases — with the
   completion checks on and off, side by side: two nodes on this machine (shipped default model, CPU),
   the same phantom studies (28 slices of 512x512 from below the skull base to the vertex) sent to each
   in turn. Target: the checks keep a normal send within quiet_seconds + 2 s. Printed: both medians, the
   worst with the checks on over the target, and the on/off ratio; and, apart from the model's time (which
   dominates on a loaded CPU), how long after the release each series was judged complete.
2. The checks themselves on a 300-slice series (0.5 mm, 512x512): the first judgement (one header read
   per instance + the pixels of 9 slices), the same series again (cached, what every tick of a held series
   costs), and after one more instance (cached headers, new pixel reads).

    .venv/bin/python bench/bench_completion.py [--studies 3] [--quiet 2] [--slices 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ihd_node.config import default_config
from ihd_node.imaging.headers import geometry_cache, read_geometry
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_files
from ihd_node.sim.phantom import make_series, write_series
from ihd_node.triage.completion import CompletionJudge


def time_to_result(node: Node, pacs: MiniPACS, files: list[Path], series_uid: str,
                   study_uid: str) -> tuple[float, float]:
    """(seconds from the end of the send to the last result object in the PACS, seconds from the
    association's release to the series judged complete: quiet_seconds + the tick + the checks)."""
    send_files(files, host="127.0.0.1", port=node.port, called_aet=node.config.node.ae_title,
               calling_aet="PACS")
    sent = time.time()
    deadline = sent + 120
    while time.time() < deadline:
        row = node.db.get_series(series_uid)
        if row is not None and row.state in ("delivered", "failed", "ignored"):
            break
        time.sleep(0.02)
    objects = pacs.objects(study_uid)
    assert row is not None and row.state == "delivered" and objects, f"{row}"
    return (max(o.received_at for o in objects) - sent,
            (row.completed - row.association_released).total_seconds())


def sends(root: Path, studies: int, quiet: float) -> None:
    target = quiet + 2.0
    nodes = {}
    pacs = {}
    for checks in (True, False):
        name = "on" if checks else "off"
        pacs[name] = MiniPACS(root / f"pacs-{name}", ae_title="PACS").start()
        config = default_config(root / f"node-{name}", node={"host": "127.0.0.1", "port": free_port()},
                                series={"quiet_seconds": quiet, "check_geometry": checks,
                                        "check_coverage": checks},
                                destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                               "port": pacs[name].port}])
        nodes[name] = Node(config).start()
    times: dict[str, list[float]] = {"on": [], "off": []}
    completes: dict[str, list[float]] = {"on": [], "off": []}
    completion = None
    try:
        for k in range(studies):
            for name in ("on", "off") if k % 2 == 0 else ("off", "on"):  # neither always goes first
                # Each node gets its own copy (its own UIDs): the same head, slices, encoding.
                series = make_series(400 + k, subtypes=["subdural"] if k % 2 == 0 else [], n_slices=28,
                                     slice_spacing=5.5, series_number=1 if name == "on" else 2)
                files = write_series(series, root / f"study{k}-{name}")
                took, judged = time_to_result(nodes[name], pacs[name], files, series.series_instance_uid,
                                              series.study_instance_uid)
                times[name].append(took)
                completes[name].append(judged)
                if name == "on":
                    completion = nodes["on"].db.latest_completion(series.series_instance_uid)
                print(f"study {k}, checks {name:3}: time to result {took:5.2f} s, judged complete "
                      f"{judged:4.2f} s after the release")
    finally:
        for node in nodes.values():
            node.stop()
        for p in pacs.values():
            p.stop()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    worst = max(times["on"])
    print(f"evidence of the last study: {completion.evidence if completion else '?'}")
    print(f"time to result, checks on: median {on:.2f} s, worst {worst:.2f} s; checks off: median {off:.2f} s; "
          f"on/off {on / off:.2f}; worst on / target (quiet_seconds + 2 = {target:.1f} s) {worst / target:.2f} "
          f"{'OK' if worst <= target else 'OVER'}")
    c_on, c_off = statistics.median(completes["on"]), statistics.median(completes["off"])
    print(f"judged complete after the release (quiet_seconds {quiet:g} s + tick + checks): checks on median "
          f"{c_on:.2f} s, off {c_off:.2f} s; the checks add {c_on - c_off:+.2f} s (on/off {c_on / c_off:.2f})")


def checks_cost(root: Path, n: int) -> None:
    spacing = max(0.5, 150.0 / (n - 1))
    series = make_series(500, subtypes=[], n_slices=n, size=512, slice_spacing=spacing, thin=True)
    files = write_series(series, root / "long")
    by_uid = {read_geometry(str(p)).sop_instance_uid: str(p) for p in files}
    instances = [(uid, by_uid[uid]) for uid in series.sop_uids_sorted]
    cache = geometry_cache()
    judge = CompletionJudge(cache=cache)
    t0 = time.perf_counter()
    first = judge.evidence("1.2", "1.2.3", instances[:-1], version=1)
    t1 = time.perf_counter()
    reads = cache.reads
    again = judge.lookup("1.2.3", 1)
    t2 = time.perf_counter()
    judge.evidence("1.2", "1.2.3", instances, version=2)
    t3 = time.perf_counter()
    assert again is first
    print(f"checks on {n} slices of 512x512 ({spacing:.2f} mm): first judgement {t1 - t0:.2f} s "
          f"({reads} header reads + 9 slices' pixels: {first.describe()}); cached {1000 * (t2 - t1):.2f} "
          f"ms; one more instance {t3 - t2:.2f} s (1 header read); first/one-more {(t1 - t0) / (t3 - t2):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--slices", type=int, default=300, help="slices of the long series in part 2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        sends(Path(tmp), args.studies, args.quiet)
        checks_cost(Path(tmp), args.slices)


if __name__ == "__main__":
    main()
