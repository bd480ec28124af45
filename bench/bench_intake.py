"""Intake speed: the node vs dcmtk storescp vs a bare pynetdicom SCP, on the same slices, side by side.

dcmtk `storescu` sends the same N slices (512x512 phantom CT, explicit VR little endian) over loopback to
each receiver in turn; each receiver is a fresh process with a fresh folder, and the order rotates every
round so that noise from other work on the machine hits all three alike. Printed: the median wall time of
storescu per receiver, the node's and the bare SCP's ratio to storescp (speed: storescp time / theirs), and
the same with the slices split over C concurrent associations (C storescu processes at once).

- storescp: dcmtk's SCP, writing each instance to a file (no fsync); `--fork` for the concurrent run.
- bare: a pynetdicom SCP whose C-STORE handler answers 0x0000 and does nothing else (the floor of any
  node built on pynetdicom's stock reactors and codec), with the node's socket conditions: TCP_NODELAY on
  the accepted socket and the node's Max PDU Length announced.
- All three get TCP_NODELAY: storescp and storescu by dcmtk's default (TCP_NODELAY=1 in the environment).
- node: `ihd-node serve` with the shipped model loaded; every instance is fsynced and recorded in the
  database before it is answered (the quiet period is set long, so no analysis runs while timing).

`--profile` adds one node run under py-spy (pip install py-spy) and prints the top costs of the node's
receiving threads (own time and inclusive time per function). `--baseline PYTHON` adds a fourth receiver,
`ihd-node serve` run by another checkout's interpreter (e.g. /work/main/.venv/bin/python), in the same
rotation: a change's effect side by side, which the machine's noise would hide between separate runs.

    .venv/bin/python bench/bench_intake.py [--slices 300] [--rounds 3] [--concurrent 8] [--profile]
                                           [--baseline OTHER_CHECKOUT/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ihd_node.sim.mini_pacs import free_port
from ihd_node.sim.phantom import make_series, write_series

AET = "IHD_AI"
BARE_SCP = r"""
import socket, sys
from pynetdicom import AE, AllStoragePresentationContexts, evt
from ihd_node.dicom_network import DEFAULT_MAX_PDU
from ihd_node.intake.receiver import TRANSFER_SYNTAXES
ae = AE(ae_title=sys.argv[2])
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
ae.maximum_pdu_size = DEFAULT_MAX_PDU  # what the node announces: storescu sends both the same PDUs

def nodelay(event):  # as the node: responses do not wait for Nagle's timer
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

server = ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False,
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, nodelay)])
print("listening", flush=True)
sys.stdin.read()  # until the bench closes our stdin
server.shutdown()
"""


def py_spy() -> str | None:
    """py-spy next to this Python (a venv's bin is often not on PATH), or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Receiver:
    """One receiver process, started fresh for one timed transfer."""

    def __init__(self, kind: str, root: Path, concurrent: bool, profile_to: Path | None = None,
                 python: str = sys.executable) -> None:
        self.kind, self.root, self.port = kind, root, free_port()
        root.mkdir(parents=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.log = open(root / "log.txt", "w")  # noqa: SIM115 (closed in stop)
        if kind == "storescp":
            out = root / "out"
            out.mkdir()
            cmd = ["storescp", "--aetitle", AET, "--output-directory", str(out), str(self.port)]
            if concurrent:
                cmd.insert(1, "--fork")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        elif kind == "bare":
            self.proc = subprocess.Popen([sys.executable, "-c", BARE_SCP, str(self.port), AET],
                                         stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                         env=env)
        else:
            config = {"node": {"ae_title": AET, "host": "127.0.0.1", "port": self.port, "max_associations": 16},
                      "storage": {"dir": str(root / "state"), "min_free_mb": 0},
                      "series": {"quiet_seconds": 3600, "max_wait_seconds": 7200},
                      "model": {"checkpoint": "default", "device": "cpu"}, "logging": {"level": "WARNING"}}
            (root / "config.yaml").write_text(yaml.safe_dump(config))
            cmd = [python, "-m", "ihd_node", "serve", "--config", str(root / "config.yaml")]
            if profile_to is not None:
                cmd = [str(py_spy()), "record", "--format", "raw", "--rate", "500", "--threads",
                       "-o", str(profile_to), "--", *cmd]
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, self.proc)

    def stored(self) -> int:
        """How many instances the receiver kept (the bare SCP keeps nothing: -1)."""
        if self.kind == "storescp":
            return sum(1 for _ in (self.root / "out").iterdir())
        if self.kind in ("node", "baseline"):
            with sqlite3.connect(f"file:{self.root / 'state' / 'ihd.sqlite'}?mode=ro", uri=True) as conn:
                return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
        return -1

    def stop(self) -> None:
        if self.kind == "bare":
            self.proc.stdin.close()  # type: ignore[union-attr]
        else:
            self.proc.send_signal(2)  # SIGINT: the node stops cleanly, py-spy writes its profile
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def send(folders: list[Path], port: int) -> float:
    """Wall seconds for one storescu per folder, all started at once, to finish."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", AET, "+sd", "127.0.0.1", str(port), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for folder in folders]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {out.decode(errors='replace')[-2000:]}")
    return elapsed


def split(files: list[Path], parts: int, root: Path) -> list[Path]:
    """The files spread over `parts` folders (hard links: no copies)."""
    folders = [root / f"part{k}" for k in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, folders[i % parts] / f.name)
    return folders


def durable_writes(files: list[Path], root: Path) -> float:
    """Seconds to write the same bytes as the node does for each instance (temp file, fsync, rename, fsync of
    the folder), alone: the floor that durability puts under the node's time on this disk, right now."""
    from ihd_node.intake.spool import write_atomic

    root.mkdir()
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        write_atomic(root / f"{i}.dcm", f.read_bytes(), fault=None)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(root)
    return elapsed


def top_costs(raw: Path, n: int = 12) -> list[str]:
    """Own and inclusive sample shares per function of the threads that received (py-spy raw format)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # Receiving threads only: pynetdicom's association and DUL reactors (the accept loop is idle).
        if not any(("run_reactor" in f or "_run_reactor" in f or "_serve_request" in f) for f in frames):
            continue
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 for f in frames[1:]]
        if not names:  # a thread's bare entry frame
            continue
        samples = int(count)
        total += samples
        own[names[-1]] += samples
        for name in set(names):
            incl[name] += samples
    if not total:
        return ["(no samples of the receiving threads)"]
    out = [f"{total} samples of the receiving threads; own time:"]
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(n)]
    out.append("  inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in incl.most_common(n + 8)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=8, help="associations at once (0: skip)")
    parser.add_argument("--profile", action="store_true", help="one more node run under py-spy")
    parser.add_argument("--baseline", metavar="PYTHON", help="also run `ihd-node serve` with this interpreter "
                        "(another checkout's venv), side by side")
    args = parser.parse_args()
    if not (shutil.which("storescu") and shutil.which("storescp")):
        print("dcmtk (storescu, storescp) is not installed: apt-get install dcmtk")
        return 2

    kinds = ["storescp", "bare", "node"] + (["baseline"] if args.baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series = make_series(11, subtypes=[], n_slices=args.slices, size=args.size, encoding="int16")
        files = write_series(series, root / "slices")
        mb = sum(f.stat().st_size for f in files) / 2**20
        single = split(files, 1, root / "one")
        many = split(files, args.concurrent, root / "many") if args.concurrent else []
        times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        runs = 0
        for r in range(args.rounds):
            for conc, folders in ((1, single), (args.concurrent, many)):
                if not folders:
                    continue
                for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order each round
                    runs += 1
                    rx = Receiver(kind, root / f"run{runs}-{kind}", concurrent=conc > 1,
                                  python=args.baseline if kind == "baseline" else sys.executable)
                    try:
                        seconds = send(folders, rx.port)
                        stored = rx.stored()
                    except RuntimeError as exc:
                        raise RuntimeError(f"{kind}, {conc} association(s): {exc}; its log: "
                                           f"{(rx.root / 'log.txt').read_text()[-3000:]}") from None
                    finally:
                        rx.stop()
                    if stored not in (-1, len(files)):
                        raise RuntimeError(f"{kind} kept {stored} of {len(files)} instances")
                    times[(kind, conc)].append(seconds)
                    shutil.rmtree(rx.root, ignore_errors=True)
            times[("fsync", 1)].append(durable_writes(files, root / f"durable{r}"))
        profile = None
        if args.profile:
            if not py_spy():
                print("py-spy is not installed (pip install py-spy): no profile")
            else:
                raw = root / "profile.txt"
                rx = Receiver("node", root / "profiled", concurrent=False, profile_to=raw)
                try:
                    send(single, rx.port)
                finally:
                    rx.stop()
                if raw.exists() and os.environ.get("KEEP_PROFILE"):  # for a closer look (flamegraph.pl)
                    shutil.copy(raw, os.environ["KEEP_PROFILE"])
                profile = top_costs(raw) if raw.exists() else ["(py-spy wrote no profile)"]

    print(f"intake: {args.slices} slices of {args.size}x{args.size} ({mb:.0f} MB) from dcmtk storescu over "
          f"loopback, TCP_NODELAY=1, median of {args.rounds} alternating rounds; {os.cpu_count()} CPUs")
    for conc in (1, args.concurrent):
        if (("storescp", conc)) not in times:
            continue
        ref = statistics.median(times[("storescp", conc)])
        label = "1 association" if conc == 1 else f"{conc} concurrent associations"
        print(f"  {label}:")
        for kind in kinds:
            t = statistics.median(times[(kind, conc)])
            per = 1000 * t / args.slices
            print(f"    {kind:9s} {t:6.2f} s  {per:5.2f} ms/instance  {args.slices / t:6.0f} instances/s  "
                  f"speed vs storescp {ref / t:4.2f}  (runs: {', '.join(f'{x:.2f}' for x in times[(kind, conc)])})")
        if conc == 1:
            t = statistics.median(times[("fsync", 1)])
            print(f"    (writing the {args.slices} instances durably alone, as the node does: {t:.2f} s, "
                  f"{1000 * t / args.slices:.2f} ms/instance, on this disk in the same rounds)")
        node, bare = statistics.median(times[("node", conc)]), statistics.median(times[("bare", conc)])
        print(f"    node/storescp speed {ref / node:.2f} (target >= 0.5: {'OK' if ref / node >= 0.5 else 'UNDER'}); "
              f"node vs bare pynetdicom {bare / node:.2f} (target >= 1: {'OK' if bare / node >= 1 else 'UNDER'})")
        if args.baseline:
            base = statistics.median(times[("baseline", conc)])
            print(f"    node vs baseline ({args.baseline}): {base / node:.2f}x the speed")
    if profile:
        print("node receive path under py-spy (1 association):")
        for line in profile:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
