"""Throughput of a multi-machine node on this machine, and what the job queue costs per job.

One PostgreSQL (tests/pg.py: initdb + pg_ctl in a temporary folder), a receiving MiniPACS, and in turn:
  single   `ihd-node serve` (all roles in one process, in-memory queue) on PostgreSQL;
  1 worker `serve --roles receive,deliver` + one `ihd-node worker`;
  2 workers the same with two workers.
Each mode gets N phantom studies sent at once (throughput: studies per minute from the first C-STORE to
the last result stored at the PACS), then K studies one at a time (queue overhead: the mean time from
"series complete" to "analysis started" in the database, cluster minus single, in ms per job: the queue
round trip - submit, NOTIFY, claim with SKIP LOCKED, worker start-up of the job - against a Python queue).

All processes share this machine's cores: on a 2-core machine two workers compete for the same CPUs,
so the figures show the overhead honestly but not what a second GPU machine adds.

    .venv/bin/python bench/bench_cluster.py [--studies 8] [--sequential 3] [--slices 16] [--model tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_files  # noqa: E402
from ihd_node.sim.phantom import make_series, write_series  # noqa: E402
from tests.pg import PostgresServer, why_no_postgres  # noqa: E402


def tiny_checkpoint(folder: Path) -> str:
    import torch

    from ihd_node.classes import CLASSES
    from ihd_node.model.checkpoint import save_checkpoint
    from ihd_node.model.network import IhdModel
    from ihd_node.model.presets import tiny_config

    torch.manual_seed(0)
    path = folder / "tiny.pt"
    save_checkpoint(path, IhdModel(tiny_config()), thresholds=dict.fromkeys(CLASSES, 0.3), name="tiny-random",
                    version="0", provenance={"data": "random init, for the benchmark"})
    return str(path)


class Proc:
    def __init__(self, folder: Path, name: str, config: dict, command: list[str]) -> None:
        self.config_path = folder / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "ihd_node", *command, "--config",
                                         str(self.config_path)], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_for(self, needle: str, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"{self.config_path.stem} did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run_mode(mode: str, workers: int, pg: PostgresServer, pacs: MiniPACS, folder: Path, checkpoint: str,
             args: argparse.Namespace, seed: int) -> dict[str, float]:
    url = pg.create_database()
    port = free_port()
    config = {
        "node": {"ae_title": "IHD_AI", "host": "127.0.0.1", "port": port, "max_associations": 32},
        "storage": {"dir": str(folder / "shared"), "min_free_mb": 0},
        "database": {"url": url},
        "series": {"quiet_seconds": 0.5},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "model": {"checkpoint": checkpoint, "device": "cpu"},
        "analysis": {"max_secondary_captures": 2},
        "delivery": {"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0},
        "web": {"enabled": False},
    }
    procs = []
    if mode == "single":
        procs.append(Proc(folder, "node", config, ["serve"]))
        procs[0].wait_for("scp.listening")
    else:
        procs.append(Proc(folder, "receiver", config, ["serve", "--roles", "receive,deliver"]))
        procs[0].wait_for("scp.listening")
        for i in range(workers):
            procs.append(Proc(folder, f"worker{i}", {**config, "node": {**config["node"], "port": free_port()}},
                              ["worker"]))
        for p in procs[1:]:
            p.wait_for("roles=analyse")
    engine = create_engine(url)

    def delivered(uids: list[str]) -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM series WHERE state = 'delivered' AND "
                                         "series_instance_uid = ANY(:u)"), {"u": uids}).scalar())

    def wait_delivered(uids: list[str]) -> None:
        deadline = time.monotonic() + 600
        while delivered(uids) < len(uids):
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: not all delivered; logs in {folder}")
            time.sleep(0.1)

    try:
        studies = []
        for k in range(args.studies + args.sequential):
            series = make_series(seed + k, subtypes=["subdural"] if k % 2 else [], n_slices=args.slices, size=128)
            studies.append((series.series_instance_uid, write_series(series, folder / f"{mode}{workers}-{k}")))
        burst, one_by_one = studies[:args.studies], studies[args.studies:]
        # Throughput: all at once.
        barrier = threading.Barrier(len(burst))

        def send(files: list[Path]) -> None:
            barrier.wait()
            send_files(files, host="127.0.0.1", port=port, called_aet="IHD_AI", calling_aet="PACS")

        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(files,)) for _, files in burst]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_delivered([uid for uid, _ in burst])
        seconds = time.monotonic() - started
        # Queue overhead: one at a time, nothing waits behind another job.
        for uid, files in one_by_one:
            send_files(files, host="127.0.0.1", port=port, called_aet="IHD_AI", calling_aet="PACS")
            wait_delivered([uid])
        with engine.connect() as conn:
            waits = [float(w) for (w,) in conn.execute(text(
                "SELECT EXTRACT(EPOCH FROM analysis_started - completed) FROM series "
                "WHERE series_instance_uid = ANY(:u)"), {"u": [uid for uid, _ in one_by_one]})]
    finally:
        for p in procs:
            p.stop()
        engine.dispose()
    return {"per_minute": len(burst) * 60.0 / seconds, "seconds": seconds,
            "wait_ms": statistics.mean(waits) * 1000.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="studies sent at once per mode")
    parser.add_argument("--sequential", type=int, default=3, help="studies sent one at a time per mode")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--model", default="tiny", help="tiny (random, fast) or a checkpoint path / default")
    args = parser.parse_args()
    reason = why_no_postgres()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory(prefix="ihd-bench-cluster-") as tmp:
        root = Path(tmp)
        checkpoint = tiny_checkpoint(root) if args.model == "tiny" else args.model
        pg = PostgresServer().init().start()
        try:
            with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
                results = {}
                for i, (mode, workers) in enumerate((("single", 1), ("cluster", 1), ("cluster", 2))):
                    folder = root / f"{mode}{workers}"
                    folder.mkdir()
                    results[(mode, workers)] = run_mode(mode, workers, pg, pacs, folder, checkpoint, args,
                                                        seed=1000 * (i + 1))
        finally:
            pg.destroy()
    single, one, two = results[("single", 1)], results[("cluster", 1)], results[("cluster", 2)]
    print(f"{args.studies} studies x {args.slices} slices sent at once, model {args.model}, {os.cpu_count()} CPUs")
    for name, r in (("single process", single), ("cluster, 1 worker", one), ("cluster, 2 workers", two)):
        print(f"  {name:<20} {r['per_minute']:6.1f} studies/min ({r['seconds']:.1f} s); "
              f"complete -> analysis started {r['wait_ms']:.0f} ms")
    print(f"queue overhead per job (cluster 1 worker - single): {one['wait_ms'] - single['wait_ms']:.0f} ms")
    print(f"ratio 2 workers / 1 worker: {two['per_minute'] / one['per_minute']:.2f}; "
          f"cluster 1 worker / single: {one['per_minute'] / single['per_minute']:.2f}")


if __name__ == "__main__":
    main()
