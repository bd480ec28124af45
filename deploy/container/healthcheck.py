"""The image's HEALTHCHECK: exit 0 when the node's /healthz answers 200 (ready, or ready with a drift
warning), 1 otherwise, with one line saying why. Standard library only: slim images have no curl.

The URL is $IHD_NODE_HEALTH_URL when set; otherwise it is read from the node's config ($IHD_NODE_CONFIG):
web.port (default 8112) on 127.0.0.1, or web.host when it is a specific address. Reading the config needs
PyYAML, which the node itself depends on (this runs with the image's venv Python)."""

import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8112


def health_url() -> str:
    url = os.environ.get("IHD_NODE_HEALTH_URL")
    if url:
        return url
    web: dict = {}
    path = os.environ.get("IHD_NODE_CONFIG", "/etc/ihd-node/config.yaml")
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            web = (yaml.safe_load(f) or {}).get("web") or {}
        if not isinstance(web, dict):
            raise ValueError("web: is not a mapping")
    except Exception as exc:  # noqa: BLE001 -- the node reports a bad config itself; probe the default port
        web = {}
        print(f"healthcheck: {path}: {type(exc).__name__}; using port {DEFAULT_PORT}", file=sys.stderr)
    if web.get("enabled", True) is False:
        sys.exit(f"healthcheck: web.enabled is false in {path}: no /healthz to ask")
    host = str(web.get("host") or "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(web.get('port') or DEFAULT_PORT)}/healthz"


def main() -> int:
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("IHD_NODE_HEALTH_TIMEOUT", "8"))) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as exc:  # 503: not ready or degraded, with the reason in the body
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}")
        return 1
    try:
        word = json.loads(body).get("status", "?")
        failed = [f"{k}: {v.get('detail')}" for k, v in json.loads(body).get("checks", {}).items() if not v.get("ok")]
    except (ValueError, AttributeError):
        word, failed = body[:80].decode("utf-8", "replace"), []
    print(f"healthcheck: {url}: {status} {word}" + (f" ({'; '.join(failed)})" if failed else ""))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
