"""OHIF's published build served on a local port for the browser test, with /dicom-web proxied to Orthanc.

One origin for the app and the DICOMweb API, so the browser needs no CORS. The build is the npm package
`@ohif/app` (version pinned in the Makefile, unpacked by `make viewer` into the git-ignored .viewer/);
nothing is downloaded here. Its app-config.js is replaced by one that points the default data source at
/dicom-web.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ihd_node.sim.mini_pacs import free_port

ROOT = Path(__file__).resolve().parents[1]
OHIF_VERSION = (ROOT / "Makefile").read_text().split("OHIF_VERSION := ", 1)[1].split()[0]
OHIF_DIST = ROOT / ".viewer" / f"ohif-{OHIF_VERSION}" / "dist"

# OHIF (3.13.2, also 3.14.0-beta.6) cannot open a TID 1500 SR whose Imaging Measurements hold a measurement
# group without spatial coordinates (the node's six TID 1501 findings): its SR SOP class handler
# (extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts, _checkIfCanAddMeasurementsToDisplaySet)
# reads `measurement.coords[0].ReferencedSOPSequence` of every measurement, a TypeError for one without
# coordinates, so the SR never loads and its viewport stays black. Its own hook, called just before that
# line, gives such a measurement an empty coordinate, which the handler then skips. The README gives this
# line to sites that run OHIF; the test runs OHIF as they would.
OHIF_SR_CUSTOMIZATION = (
    "window.config.customizationService = [{onBeforeSRAddMeasurement: {$set: ({ measurement }) =>\n"
    "  measurement.coords && measurement.coords.length ? measurement : { ...measurement, coords: [{}] }}}];\n")

DATA_SOURCE = {
    "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
    "sourceName": "orthanc",
    "configuration": {
        "friendlyName": "Orthanc (test)", "name": "orthanc",
        "wadoUriRoot": "/dicom-web", "qidoRoot": "/dicom-web", "wadoRoot": "/dicom-web",
        "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
        "staticWado": False, "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    },
}
APP_CONFIG = "window.config = " + json.dumps({
    "routerBasename": "/", "extensions": [], "modes": [], "customizationService": {},
    "showStudyList": True, "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
    "showCPUFallbackMessage": False, "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
    "investigationalUseDialog": {"option": "never"}, "defaultDataSourceName": "orthanc",
    "dataSources": [DATA_SOURCE],
}) + ";\n" + OHIF_SR_CUSTOMIZATION


class ViewerServer:
    """Serves OHIF_DIST (single-page app: unknown paths get index.html) and proxies /dicom-web/."""

    def __init__(self, orthanc_http_port: int, dist: Path = OHIF_DIST) -> None:
        self.dist = dist
        self.orthanc_port = orthanc_http_port
        self.port = free_port()
        self.requests: list[str] = []  # paths asked for, to tell what the app fetched

    def start(self) -> ViewerServer:
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(server.dist), **kwargs)

            def log_message(self, *args) -> None:  # quiet: the test reports what matters
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append(self.path)
                if self.path.startswith("/dicom-web/"):
                    return self._proxy()
                if self.path.split("?")[0] == "/app-config.js":
                    return self._send(200, APP_CONFIG.encode(), "application/javascript")
                local = (server.dist / self.path.split("?")[0].lstrip("/")).resolve()
                if not local.is_file() or server.dist.resolve() not in local.parents:
                    self.path = "/index.html"  # the app's own routes (/viewer?StudyInstanceUIDs=...)
                return super().do_GET()

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", server.orthanc_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                try:
                    conn.request("GET", self.path, headers=headers)
                    rsp = conn.getresponse()
                    body = rsp.read()
                finally:
                    conn.close()
                self.send_response(rsp.status)
                for key, value in rsp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
