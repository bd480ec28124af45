"""Building and running deploy/container/Containerfile with podman, for tests/test_container_run.py and
`make container-image` (`python tests/podman.py`).

What this machine class needs, found on the development machine (podman 4.3.1, a Firecracker VM with cgroup
v1 and a v2 hierarchy mounted beside it, no CAP_SYS_RESOURCE):
* crun refuses the hybrid cgroup layout ("cgroups in hybrid mode not supported"): runc is used when installed;
* podman's default rlimits for root (nofile, nproc 1048576+) cannot be raised here: explicit, lower ones;
* no container registry resolves (Docker Hub, quay.io, ghcr.io, ...) while the Debian mirror and PyPI do: when
  python:3.11-slim-bookworm cannot be pulled, the base is Debian bookworm with python3 and python3-venv made by
  mmdebstrap (Python 3.11, Debian like the slim image) and imported as localhost/ihd-node-base:bookworm;
* PyPI is reached through a TLS-intercepting proxy whose CA only the host trusts, and the wheels lie in local
  folders: the build gets the host's pip configuration (index, find-links, constraints, CA bundle) as
  read-only build volumes;
* PyTorch's CPU index does not resolve and only a CPU torch (no CPU torchvision) lies in the local wheels: the
  test then builds VARIANT=cuda (PyPI's torch, which runs on the CPU too) and says so (torch_choice).
"""

from __future__ import annotations

import configparser
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_BASE = "docker.io/library/python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/ihd-node-base:bookworm"
IMAGE = "localhost/ihd-node:test"
DEBIAN_MIRROR = os.environ.get("IHD_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


def run_options() -> list[str]:
    """Options for `podman run` and `podman build` that this machine class needs (see the module doc)."""
    options = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    if shutil.which("runc"):
        options[:0] = ["--runtime", "runc"]
    return options


def why_no_podman() -> str | None:
    """None when podman can run a container here, else why not (the skip reason)."""
    if shutil.which("podman") is None:
        return "podman is not installed: apt-get install podman runc (.ci/packages.txt)"
    try:
        podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except subprocess.CalledProcessError as exc:
        return f"`podman info` fails: {(exc.stderr or '').strip().splitlines()[-1:]}"
    return None


def _exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def base_image(build_if_missing: bool) -> tuple[str | None, str]:
    """(the base image to build on, how it was found) or (None, why there is none)."""
    if _exists(UPSTREAM_BASE):
        return UPSTREAM_BASE, "pulled earlier"
    pulled = podman("pull", "--quiet", UPSTREAM_BASE, timeout=600, check=False)
    if pulled.returncode == 0:
        return UPSTREAM_BASE, "pulled"
    pull_error = (pulled.stderr.strip().splitlines() or ["?"])[-1]
    if _exists(LOCAL_BASE):
        return LOCAL_BASE, f"made by mmdebstrap earlier ({UPSTREAM_BASE} cannot be pulled: {pull_error})"
    if not build_if_missing:
        return None, (f"{UPSTREAM_BASE} cannot be pulled ({pull_error}) and there is no {LOCAL_BASE}: "
                      "`make container-image` makes one from Debian packages")
    if shutil.which("mmdebstrap") is None:
        return None, f"{UPSTREAM_BASE} cannot be pulled ({pull_error}) and mmdebstrap is not installed"
    with tempfile.TemporaryDirectory(prefix="ihd-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                        "--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm", str(tar), DEBIAN_MIRROR],
                       check=True, capture_output=True, timeout=3600)
        podman("import", "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "--change", 'CMD=["python3"]', str(tar), LOCAL_BASE, timeout=600)
    return LOCAL_BASE, f"made now by mmdebstrap ({UPSTREAM_BASE} cannot be pulled: {pull_error})"


def pip_settings() -> dict[str, str]:
    """This machine's pip settings as `pip config list` shows them (files, then PIP_* variables)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        found = re.fullmatch(r"(?:global|install|:env:)\.([\w-]+)='(.*)'", line.strip())
        if found:
            settings[found.group(1)] = found.group(2)
    return settings


def build_pip_options(workdir: Path) -> tuple[list[str], list[str], str]:
    """(podman build options giving the build this machine's pip configuration, build args, which torch)."""
    settings = pip_settings()
    parser = configparser.ConfigParser(interpolation=None)
    parser["global"] = settings
    conf = workdir / "pip.conf"
    with conf.open("w") as f:
        parser.write(f)
    volumes = [f"{conf}:/etc/pip.conf:ro"]
    paths = {settings[k] for k in ("cert", "constraint") if k in settings}
    for key in ("find-links", "index-url", "extra-index-url"):
        for value in settings.get(key, "").split():
            path = value.removeprefix("file://")
            if path.startswith("/"):
                paths.add(path.removesuffix("/simple") if path.endswith("/simple") else path)
    volumes += [f"{p}:{p}:ro" for p in sorted(paths) if Path(p).exists()]
    args, why = torch_choice(settings)
    return [o for v in volumes for o in ("-v", v)], args, why


def torch_choice(settings: dict[str, str]) -> tuple[list[str], str]:
    """(build args, why): the CPU variant where a CPU torch + torchvision pair is at hand (PyTorch's CPU index,
    or both +cpu wheels in a local wheel folder); otherwise the CUDA variant from the configured index. A CPU
    torch with PyPI's torchvision does not work: that torchvision is built against CUDA torch (its import fails
    with "operator torchvision::nms does not exist"), which is what this machine has (only torch+cpu locally)."""
    found: dict[str, str] = {}
    for folder in settings.get("find-links", "").split():
        for name in ("torch", "torchvision"):
            for wheel in sorted(glob.glob(f"{folder.removeprefix('file://')}/{name}-*+cpu-cp311-*.whl")):
                found[name] = Path(wheel).name.split("-")[1]
    if set(found) == {"torch", "torchvision"}:
        return (["--build-arg", f"TORCH_PIP_ARGS=torch=={found['torch']} torchvision=={found['torchvision']}"],
                f"CPU variant from local wheels {found}")
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        return [], "CPU variant from download.pytorch.org/whl/cpu"
    except OSError as exc:
        return (["--build-arg", "VARIANT=cuda"],
                f"CUDA variant (PyPI wheels, runs on the CPU too): download.pytorch.org does not resolve ({exc}) "
                f"and the local wheels have no CPU torch + torchvision pair (found {found or 'none'})")


def build(base: str, tag: str = IMAGE, timeout: float = 3600) -> tuple[float, str]:
    """Build the image, the CPU variant where it can be built here (podman's layer cache makes a rebuild of
    changed sources quick): (seconds, which torch and why)."""
    with tempfile.TemporaryDirectory(prefix="ihd-build-") as tmp:
        volumes, args, why = build_pip_options(Path(tmp))
        started = time.monotonic()
        subprocess.run(["podman", "build", *run_options(), "--network", "host", "--layers", "--format", "docker",
                        "-f", "deploy/container/Containerfile", "--build-arg", f"PYTHON_IMAGE={base}", *args,
                        *volumes, "-t", tag, "."], cwd=ROOT, check=True, timeout=timeout,
                       stdout=sys.stderr if __name__ == "__main__" else subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
        return time.monotonic() - started, why


if __name__ == "__main__":  # make container-image
    reason = why_no_podman()
    if reason:
        sys.exit(f"container image: {reason}")
    found, how = base_image(build_if_missing=True)
    if found is None:
        sys.exit(f"container image: {how}")
    print(f"base {found}: {how}")
    seconds, why = build(found)
    print(f"built {IMAGE} in {seconds:.0f} s; torch: {why}")
