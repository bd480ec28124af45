"""Time from a study's last C-STORE to its result at the RIS (the ORU's ACK), at the EHR (the FHIR
transaction's answer) and at the PACS (the SR stored), side by side in one run.

The node runs as a real `ihd-node serve` subprocess with the shipped default model on this machine's CPU
and three destinations: a small PACS in this process (C-STORE), an MLLP listener of the `hl7` package
answering AA, and an HTTP endpoint answering FHIR transactions as a server does (200 with a
transaction-response). dcmtk `storescu` sends each study (32 slices of a positive phantom, new UIDs per send,
as bench_node.py) over loopback; each time is taken when the peer answers (ACK written, HTTP answer written,
SR stored) minus the moment storescu returned. The first study after start is shown, not counted.

    .venv/bin/python bench/bench_clinical.py [--studies 10] [--quiet 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import hl7.mllp
import yaml
from bench_node import AET, Study, series_state

from ihd_node.sim.mini_pacs import MiniPACS, free_port

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class Ris:
    """The hl7 package's MLLP server on its own loop; notes when it ACKs (AA) each study's ORU."""

    def __init__(self) -> None:
        self.acked: dict[str, float] = {}  # study UID (found in the message) -> time of the ACK
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def serve():
            return await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", 0, encoding="utf-8")

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.studies: list[str] = []

    async def _handle(self, reader, writer) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
                text = str(message)
                for uid in self.studies:
                    if uid in text:
                        self.acked.setdefault(uid, time.time())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Ehr(ThreadingHTTPServer):
    """Answers every transaction 200 with a transaction-response; notes when it answered each study."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EhrHandler)
        self.answered: dict[str, float] = {}
        self.studies: list[str] = []


class EhrHandler(BaseHTTPRequestHandler):
    server: Ehr

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        entries = json.loads(body).get("entry", [])
        answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": f"{e['resource']['resourceType']}/{i}/_history/1"}}
            for i, e in enumerate(entries)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        text = body.decode("utf-8", "replace")
        for uid in self.server.studies:
            if uid in text:
                self.server.answered.setdefault(uid, time.time())


def p50(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the node (OMP_NUM_THREADS)")
    args = parser.parse_args()
    ris, ehr = Ris(), Ehr()
    threading.Thread(target=ehr.serve_forever, daemon=True).start()
    rows: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, MiniPACS(Path(tmp) / "pacs", ae_title="PACS") as pacs:
        root = Path(tmp)
        (root / "ehr.token").write_text("bench-token\n")
        port, state = free_port(), root / "state"
        config = {"node": {"ae_title": AET, "host": "127.0.0.1", "port": port},
                  "storage": {"dir": str(state), "min_free_mb": 0},
                  "series": {"quiet_seconds": args.quiet, "max_wait_seconds": 600},
                  "destinations": [
                      {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                      {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
                       "sending_facility": "RADIOLOGY", "receiving_application": "RIS",
                       "receiving_facility": "HOSPITAL"},
                      {"name": "ehr", "kind": "fhir", "url": f"http://127.0.0.1:{ehr.server_address[1]}/fhir",
                       "auth": {"token_file": str(root / "ehr.token")}}],
                  "model": {"checkpoint": "default", "device": "cpu"}, "logging": {"level": "WARNING"}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        study = Study(32, root)
        variants = [study.variant(k) for k in range(args.studies + 1)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TCP_NODELAY": "1"}
        with open(root / "node.log", "w") as log:
            node = subprocess.Popen([sys.executable, "-m", "ihd_node", "serve", "--config", str(root / "config.yaml")],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                started = time.monotonic()
                while subprocess.run(["echoscu", "-aec", AET, "127.0.0.1", str(port)], capture_output=True).returncode:
                    assert node.poll() is None and time.monotonic() - started < 300, "the node did not start"
                    time.sleep(0.1)
                for k, (study_uid, series_uid, folder) in enumerate(variants):
                    ris.studies.append(study_uid)
                    ehr.studies.append(study_uid)
                    subprocess.run(["storescu", "-aec", AET, "+sd", "127.0.0.1", str(port), str(folder)], env=env,
                                   check=True, capture_output=True, timeout=600)
                    sent = time.time()
                    deadline = time.monotonic() + 600
                    while series_state(state / "ihd.sqlite", series_uid) not in ("delivered", "failed", "ignored"):
                        assert time.monotonic() < deadline and node.poll() is None, f"study {k} not delivered"
                        time.sleep(0.05)
                    assert series_state(state / "ihd.sqlite", series_uid) == "delivered", f"study {k} failed"
                    sr = min(o.received_at for o in pacs.objects(study_uid) if o.sop_class_uid.startswith(SR_PREFIX))
                    row = (ris.acked[study_uid] - sent, ehr.answered[study_uid] - sent, sr - sent)
                    what = "first after start" if k == 0 else f"study {k}"
                    print(f"  {what:17s} ORU ACK {row[0]:6.2f} s   FHIR answer {row[1]:6.2f} s   "
                          f"SR at PACS {row[2]:6.2f} s")
                    if k:
                        rows.append(row)
            finally:
                node.terminate()
                node.wait(120)
    oru, fhir, sr = ([r[i] for r in rows] for i in range(3))
    print(f"p50 over {len(rows)} studies: ORU ACK {p50(oru)}, FHIR answer {p50(fhir)}, SR at PACS {p50(sr)}; "
          f"ORU no later than the SR in {sum(a <= c for a, _, c in rows)} of {len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
