"""Polling for a condition in tests that drive a real node: one loop for every test module."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_until(condition: Callable[[], object], seconds: float, every: float = 0.05) -> bool:
    """True as soon as `condition()` is truthy, False when `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False
