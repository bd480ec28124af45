"""A real syslog collector for the audit tests: Debian's rsyslogd run as this user with its own config in a
temp folder, TLS (imtcp with the gtls stream driver, RFC 5425 octet counting) and UDP (imudp) inputs, each
writing the raw messages it receives to its own file, one message a line."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ihd_node.sim.mini_pacs import free_port

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
GTLS = bool(glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so"))
BOM = "\ufeff"

CONFIG = """\
global(workDirectory="{work}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{cert}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="tls") {{ action(type="omfile" file="{tls_file}" template="raw" flushOnTXEnd="on") }}
ruleset(name="udp") {{ action(type="omfile" file="{udp_file}" template="raw" flushOnTXEnd="on") }}
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" port="{tls_port}" address="127.0.0.1" ruleset="tls")
module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1" ruleset="udp")
"""


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (openssl)."""
    cert, key = folder / "collector.crt", folder / "collector.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@dataclass
class Collector:
    folder: Path
    tls_port: int = field(default_factory=free_port)
    udp_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self_signed(self.folder)
        self.tls_file, self.udp_file = self.folder / "tls.log", self.folder / "udp.log"
        (self.folder / "work").mkdir(exist_ok=True)
        self.conf = self.folder / "rsyslog.conf"
        self.conf.write_text(CONFIG.format(work=self.folder / "work", cert=self.cert, key=self.key,
                                           tls_file=self.tls_file, udp_file=self.udp_file,
                                           tls_port=self.tls_port, udp_port=self.udp_port))

    def start(self) -> Collector:
        assert RSYSLOGD is not None
        pidfile = self.folder / "rsyslogd.pid"
        pidfile.unlink(missing_ok=True)
        self.process = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(pidfile)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rsyslogd ended: {self.process.stdout.read() if self.process.stdout else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not listen within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def messages(self, udp: bool = False) -> list[str]:
        """The raw syslog messages received so far (header + BOM + XML), in order."""
        path = self.udp_file if udp else self.tls_file
        if not path.exists():
            return []
        return [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]

    @staticmethod
    def xml_of(message: str) -> str:
        """The MSG part: what follows the BOM (RFC 5424 6.4)."""
        assert BOM in message, f"no UTF-8 BOM before the MSG: {message[:120]!r}"
        return message.split(BOM, 1)[1]
