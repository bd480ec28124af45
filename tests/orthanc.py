"""A real Orthanc started for one test: its own config, storage and free ports; talked to over REST."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ihd_node.sim.mini_pacs import free_port

ORTHANC_BINARY = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
# Debian's orthanc-dicomweb package puts the plugin here.
DICOMWEB_PLUGIN = next((p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                                    Path("/usr/lib/orthanc/plugins/libOrthancDicomWeb.so")) if p.exists()), None)


@dataclass
class Orthanc:
    workdir: Path
    ai_ae_title: str
    ai_port: int
    aet: str = "ORTHANC"
    dicomweb: bool = False  # load the DICOMweb plugin (served under /dicom-web/)

    def start(self) -> Orthanc:
        self.dicom_port = free_port()
        self.http_port = free_port()
        config = {
            "Name": "ihd-node-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"ai": [self.ai_ae_title, "127.0.0.1", self.ai_port]},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb and DICOMWEB_PLUGIN else [],
            "StableAge": 1,
        }
        if self.dicomweb:
            if DICOMWEB_PLUGIN is None:
                raise RuntimeError("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.process.poll() is not None:
                    log_tail = (self.workdir / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc exited: {log_tail}") from None
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer on HTTP within 30 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str):
        return self._request("GET", path)

    def post(self, path: str, payload) -> object:
        return self._request("POST", path, json.dumps(payload).encode())

    def upload(self, file: Path) -> dict:
        return self._request("POST", "/instances", file.read_bytes(), "application/dicom")

    def download(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file",
                                    timeout=60) as response:
            return response.read()
