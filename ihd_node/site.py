"""The installation's own site value: created once at first start, kept in storage.dir.

It makes the SR's Device Observer UID differ between installations running the same model (two
hospitals are two devices), while staying the same across restarts and upgrades of one installation.
It is random, says nothing about the site, and must survive as long as the storage folder does.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

SITE_FILE = "site-id"


def site_value(folder: str | Path) -> str:
    """The site value stored in `folder`, created (32 hex digits, file 0600) when there is none."""
    path = Path(folder) / SITE_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        return text
    if text:
        raise ValueError(f"{path} is not a site value (32 hex digits); restore it from a backup or remove it "
                         "to give this installation a new Device Observer UID")
    value = uuid.uuid4().hex
    tmp = path.with_name(f".{SITE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # never replaces a value another process created meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii").strip()
