"""Load on the node process: N concurrent associations, each sending one study, and the node's peak memory.

The node runs as a real `ihd-node serve` subprocess, so its memory is its own: the shipped default model
unless --model (the same architecture with random weights while default.pt is not built). A small receiving
PACS runs in this process. N SCU threads open their associations at the same moment (a barrier) and each
sends an M-slice phantom study (4 mm slices: analysed as they are). Printed from one run: instances stored
(all statuses), series analysed, result objects delivered, wall times (sending; until the last result is
at the PACS), the node's idle RSS right after start-up (model loaded), its peak RSS (VmHWM, read while it
still runs) and their ratio, and the peak RSS per phase (receiving: compared with the pixel data received,
which the node must not hold in memory; analysing: one series at a time).

    .venv/bin/python bench/bench_load.py [--associations 8] [--slices 100] [--size 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_datasets
from ihd_node.sim.phantom import PhantomSeries, make_series

NODE_AET = "IHD_AI"


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a running process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024.0
    return out


class RssSampler:
    """VmRSS of a process every 50 ms in a thread, so the peak can be told per phase (VmHWM is one number)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, proc_status_mb(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return

    def peak_and_reset(self) -> float:
        peak, self.peak = self.peak, 0.0
        return max(peak, proc_status_mb(self.pid)["VmRSS"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def send_study(port: int, series: PhantomSeries, calling: str, barrier: threading.Barrier,
               out: dict[str, object]) -> None:
    """One association: open it, wait for the others to be open too, send every slice, release."""
    try:
        out["statuses"] = send_datasets(series.datasets, host="127.0.0.1", port=port, called_aet=NODE_AET,
                                        calling_aet=calling, timeout=120, barrier=barrier)
    except Exception as exc:  # reported by the main thread
        out["error"] = f"{type(exc).__name__}: {exc}"


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def model_checkpoint(choice: str, folder: Path) -> tuple[str, str]:
    """(model.checkpoint for the config, words for the report). "default" without the shipped file yet, or
    "compact-random": the compact preset (the shipped architecture) with random weights and thresholds 0.3,
    so every series is positive and gets its Grad-CAM images (the most work per series)."""
    from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT

    if choice == "default" and DEFAULT_CHECKPOINT.is_file():
        return "default", "the shipped default model"
    if choice not in ("default", "compact-random"):
        return choice, choice
    import torch

    from ihd_node.classes import CLASSES
    from ihd_node.model.checkpoint import save_checkpoint
    from ihd_node.model.network import IhdModel
    from ihd_node.model.presets import get_preset

    torch.manual_seed(0)
    path = folder / "compact-random.pt"
    save_checkpoint(path, IhdModel(get_preset("compact")), thresholds=dict.fromkeys(CLASSES, 0.3),
                    name="compact-random", version="0", provenance={"data": "random init, for bench_load"})
    why = " (the shipped default.pt is not built yet)" if choice == "default" else ""
    return str(path), f"the compact preset with random weights, every series positive{why}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--model", default="default",
                        help="default, compact-random, or a checkpoint file (model.checkpoint of the node)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the node (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every result")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pacs = MiniPACS(root / "pacs", ae_title="PACS").start()
        port = free_port()
        checkpoint, model_words = model_checkpoint(args.model, root)
        state = root / "state"
        config = {
            "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port,
                     "max_associations": args.associations + 2},
            "storage": {"dir": str(state), "min_free_mb": 0},
            "series": {"quiet_seconds": 1.0, "max_wait_seconds": 120},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            "model": {"checkpoint": checkpoint, "device": "cpu"},
            "analysis": {"max_queue": max(32, args.associations)},
        }
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        log_path = root / "node.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TCP_NODELAY": "1"}
        with open(log_path, "w") as log:
            node = subprocess.Popen([sys.executable, "-m", "ihd_node", "serve", "--config",
                                     str(root / "config.yaml")], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while "scp.listening" not in log_path.read_text() and node.poll() is None:
                assert time.monotonic() < deadline, "node did not start"
                time.sleep(0.1)
            assert node.poll() is None, log_path.read_text()
            time.sleep(1.0)
            idle = proc_status_mb(node.pid)["VmRSS"]

            studies = [make_series(9000 + k, n_slices=args.slices, size=args.size)
                       for k in range(args.associations)]
            pixel_mb = sum(len(ds.PixelData) for s in studies for ds in s.datasets) / 2**20
            barrier = threading.Barrier(args.associations)
            results: list[dict[str, object]] = [{} for _ in studies]
            threads = [threading.Thread(target=send_study, args=(port, s, f"MOD{k}", barrier, results[k]))
                       for k, s in enumerate(studies)]
            sampler = RssSampler(node.pid)
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sent_s = time.monotonic() - t0
            receiving_peak = sampler.peak_and_reset()
            errors = [r["error"] for r in results if "error" in r]
            assert not errors, errors

            db = state / "ihd.sqlite"
            finished = ("delivered", "failed", "ignored")
            uids = [s.series_instance_uid for s in studies]
            marks = ",".join("?" * len(uids))

            def states() -> list[str]:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
                    rows = conn.execute(f"SELECT state FROM series WHERE series_instance_uid IN ({marks})", uids)
                    return [r[0] for r in rows]

            while True:
                now = states()
                if len(now) == len(uids) and all(s in finished for s in now):
                    break
                assert time.monotonic() - t0 < args.timeout, f"not finished: {now}"
                assert node.poll() is None, "node exited"
                time.sleep(0.2)
            done_s = time.monotonic() - t0
            rss = proc_status_mb(node.pid)
            analysing_peak = sampler.peak_and_reset()
            sampler.stop()
            statuses = [st for r in results for st in r["statuses"]]  # type: ignore[union-attr]
            n_ok = sum(st == 0 for st in statuses)
            (n_instances,), = query(db, "SELECT count(*) FROM instances")
            (n_analysed,), = query(db, "SELECT count(DISTINCT series_id) FROM analyses")
            (n_objects,), = query(db, "SELECT count(*) FROM deliveries")
            (n_sent,), = query(db, "SELECT count(*) FROM deliveries WHERE status = 'sent'")
            at_pacs = len(pacs.objects())
            (load_avg, inference_avg, inference_max), = query(
                db, "SELECT avg(load_seconds), avg(inference_seconds), max(inference_seconds) FROM analyses")
        finally:
            node.terminate()
            node.wait(120)
            pacs.stop()

    total = args.associations * args.slices
    print(f"load: {args.associations} concurrent associations x {args.slices} slices of {args.size}x{args.size} "
          f"({pixel_mb:.1f} MB of pixel data);\n  model: {model_words}; node torch threads {args.threads}")
    print(f"  instances stored        {n_ok}/{total} answered 0x0000; {n_instances} recorded")
    print(f"  series analysed         {n_analysed}/{args.associations} (states: {sorted(set(now))})")
    print(f"  results delivered       {n_sent}/{n_objects} result objects sent; {at_pacs} at the PACS")
    print(f"  wall time               sending {sent_s:.1f} s ({total / sent_s:.0f} instances/s); "
          f"last result at the PACS {done_s:.1f} s after the first association")
    print(f"  per series in the node  load {load_avg:.1f} s, inference + Grad-CAM mean {inference_avg:.1f} s, "
          f"max {inference_max:.1f} s (one inference worker: the series queue up)")
    print(f"  node RSS                idle {idle:.0f} MB, peak (VmHWM) {rss['VmHWM']:.0f} MB; "
          f"peak/idle {rss['VmHWM'] / idle:.2f}x")
    print(f"  node RSS by phase       while receiving the {total} instances at most {receiving_peak:.0f} MB "
          f"(+{receiving_peak - idle:.0f} MB, {(receiving_peak - idle) / pixel_mb:.2f} x the pixel data); "
          f"while analysing one series after the other at most {analysing_peak:.0f} MB "
          f"(+{analysing_peak - idle:.0f} MB)")
    ok = n_ok == total == n_instances and n_analysed == args.associations and n_sent == n_objects == at_pacs
    print("  OK" if ok else "  NOT ALL DELIVERED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
