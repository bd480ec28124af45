"""Time to result of the whole node: from the C-STORE response of a study's last slice to its SR and
captures stored at the receiving PACS.

The node runs as a real `ihd-node serve` subprocess with the shipped default model on this machine's CPU
(OMP threads as given); dcmtk `storescu` sends each study over loopback; a small PACS in this process
receives the results. For each study size (default: 32 slices of 5 mm, and 300 thin slices of 0.625 mm
that the node combines into slabs) a fresh node is started and the first study is sent as soon as it
listens ("first after start"), then --studies more, one after the other. Printed: the first study's time,
p50 and p95 of the others, each against the target (quiet_seconds + 2 s for 32 slices, + 10 s for 300 thin
slices), and the node's own work after the quiet period. The studies are one phantom per size with new
UIDs for each send (generating 300-slice phantoms takes a minute each here). Both sizes are full heads, skull
base to vertex, and the node runs the shipped series defaults (completion evidence: geometry and coverage on),
so the times include the checks a real node makes before it calls a series complete.

    .venv/bin/python bench/bench_node.py [--studies 10] [--quiet 2] [--sizes 32,300] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml

from ihd_node.sim.mini_pacs import MiniPACS, free_port
from ihd_node.sim.phantom import make_series, write_series

AET = "IHD_AI"
# Skull base to vertex of the phantom's heads is at most 170 mm: a stack this long covers any of them
# (the phantom then reaches past both ends, as real head scans do; tests/heads.py does the same).
HEAD_SPAN_MM = 190.0
TARGET_EXTRA = {32: 2.0, 300: 10.0}  # seconds over quiet_seconds (issue 11)


def new_uid(old: str, rng: random.Random) -> str:
    """Another UID of exactly the same length (so the files can be patched byte for byte)."""
    digits = "".join(str(rng.randrange(10)) for _ in range(len(old) - 5))
    return "2.25." + str(rng.randrange(1, 10)) + digits[1:]


class Study:
    """One phantom series on disk, re-sent with new UIDs each time (same bytes otherwise)."""

    def __init__(self, n_slices: int, root: Path) -> None:
        thin = n_slices > 100
        spacing = 0.625 if thin else HEAD_SPAN_MM / (n_slices - 1)  # 300 x 0.625 mm spans 187 mm
        assert spacing * (n_slices - 1) >= 170.0 and spacing <= 10.0, f"{n_slices} slices cannot make a full head"
        series = make_series(21 if thin else 22, subtypes=["subdural"], n_slices=n_slices, encoding="int16",
                             slice_spacing=spacing)
        self.files = write_series(series, root / f"src{n_slices}")
        self.data = [f.read_bytes() for f in self.files]
        self.uids = {"study": series.study_instance_uid, "series": series.series_instance_uid}
        self.sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in self.files]
        self.root, self.n = root, n_slices
        self.rng = random.Random(n_slices)

    def variant(self, k: int) -> tuple[str, str, Path]:
        """(study UID, series UID, folder) of the k-th send."""
        study, series = new_uid(self.uids["study"], self.rng), new_uid(self.uids["series"], self.rng)
        folder = self.root / f"send{self.n}-{k}"
        folder.mkdir()
        for f, data, sop in zip(self.files, self.data, self.sops, strict=True):
            data = data.replace(self.uids["study"].encode(), study.encode())
            data = data.replace(self.uids["series"].encode(), series.encode())
            (folder / f.name).write_bytes(data.replace(sop.encode(), new_uid(sop, self.rng).encode()))
        return study, series, folder


def series_state(db: Path, uid: str) -> str | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT state FROM series WHERE series_instance_uid = ?", (uid,)).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    return row[0] if row else None


def completion_rule(db: Path, uid: str) -> str | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT completion_rule FROM series WHERE series_instance_uid = ?", (uid,)).fetchone()
    return row[0] if row else None


def breakdown(db: Path, uid: str, sent: float) -> str:
    """Where the time went, from the node's database: completion, queue, load, model, report, delivery."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        (completed, started, finished, delivered), = conn.execute(
            "SELECT completed, analysis_started, analysis_finished, delivered FROM series "
            "WHERE series_instance_uid = ?", (uid,)).fetchall()
        (load, infer, report), = conn.execute(
            "SELECT a.load_seconds, a.inference_seconds, a.report_seconds FROM analyses a JOIN series s "
            "ON a.series_id = s.id WHERE s.series_instance_uid = ? ORDER BY a.id DESC LIMIT 1", (uid,)).fetchall()

    def t(text: str) -> float:
        from datetime import UTC, datetime

        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() - sent

    return (f"complete +{t(completed):.1f}, model start +{t(started):.1f} (load {load:.2f}, model {infer:.2f}, "
            f"report {report:.2f}), finished +{t(finished):.1f}, delivered +{t(delivered):.1f}")


def run_size(study: Study, args: argparse.Namespace, root: Path, pacs: MiniPACS) -> list[float]:
    """Times to result: the first study after start, then args.studies more."""
    port = free_port()
    state = root / f"state{study.n}"
    config = {"node": {"ae_title": AET, "host": "127.0.0.1", "port": port},
              "storage": {"dir": str(state), "min_free_mb": 0},
              # The shipped completion evidence (geometry, coverage); max_wait long so a hold would show.
              "series": {"quiet_seconds": args.quiet, "max_wait_seconds": 600},
              "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
              "model": {"checkpoint": "default", "device": "cpu"}, "logging": {"level": "WARNING"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    variants = [study.variant(k) for k in range(args.studies + 1)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TCP_NODELAY": "1"}
    log = open(root / f"node{study.n}.log", "w")  # noqa: SIM115
    started = time.monotonic()
    node = subprocess.Popen([sys.executable, "-m", "ihd_node", "serve", "--config", str(root / "config.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    times = []
    try:
        while subprocess.run(["echoscu", "-aec", AET, "127.0.0.1", str(port)], capture_output=True).returncode:
            assert node.poll() is None and time.monotonic() - started < 300, "the node did not start"
            time.sleep(0.1)
        print(f"  {study.n} slices: node listening {time.monotonic() - started:.1f} s after start")
        for k, (study_uid, series_uid, folder) in enumerate(variants):
            subprocess.run(["storescu", "-aec", AET, "+sd", "127.0.0.1", str(port), str(folder)], env=env,
                           check=True, capture_output=True, timeout=600)
            sent = time.time()  # storescu has the last C-STORE response and released
            deadline = time.monotonic() + 600
            while series_state(state / "ihd.sqlite", series_uid) not in ("delivered", "failed", "ignored"):
                assert time.monotonic() < deadline and node.poll() is None, f"study {k} not delivered"
                time.sleep(0.05)
            assert series_state(state / "ihd.sqlite", series_uid) == "delivered"
            rule = completion_rule(state / "ihd.sqlite", series_uid)
            assert rule == "quiet", f"study {k} completed by {rule}, not by the quiet rule: the evidence held it"
            objects = pacs.objects(study_uid)
            times.append(max(o.received_at for o in objects) - sent)
            what = "first after start" if k == 0 else f"study {k}"
            print(f"    {what:17s} {times[-1]:6.2f} s  ({len(objects)} objects; "
                  f"{breakdown(state / 'ihd.sqlite', series_uid, sent)})")
    finally:
        node.terminate()
        node.wait(120)
        log.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--sizes", default="32,300", help="slices per study, comma-separated (32 and/or 300)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the node (OMP_NUM_THREADS)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
            for n in sizes:
                times = run_size(Study(n, root), args, root, pacs)
                rest = sorted(times[1:])
                p50 = statistics.median(rest)
                p95 = rest[min(len(rest) - 1, round(0.95 * (len(rest) - 1)))]
                target = args.quiet + TARGET_EXTRA.get(n, 10.0)
                summary.append(f"  {n:3d} slices: first after start {times[0]:5.2f} s; p50 {p50:5.2f} s, "
                               f"p95 {p95:5.2f} s over {len(rest)}; target p50 <= {target:.1f} s "
                               f"(ratio {p50 / target:.2f} {'OK' if p50 <= target else 'OVER'}); first/p50 "
                               f"{times[0] / p50:.2f}")
    print(f"time to result (last C-STORE response -> last result at the PACS), quiet_seconds {args.quiet:g}, "
          f"default model on the CPU, {args.threads} torch threads, {os.cpu_count()} CPUs:")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
