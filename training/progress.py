"""Progress bars: tqdm when installed, otherwise a small printer that writes a line every few seconds.

Training runs for hours on real data and for minutes on phantoms; either way the user should see the rate,
the loss and an estimate of the time left, also when stderr is a log file rather than a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

try:  # optional dependency
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


class SimpleProgress(Generic[T]):
    """Prints `desc  i/total  rate  eta  postfix` at most every `interval` seconds and once at the end."""

    def __init__(self, iterable: Iterable[T], total: int | None = None, desc: str = "",
                 interval: float = 5.0, enabled: bool = True) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.interval = interval
        self.enabled = enabled
        self.postfix = ""
        self.n = 0

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in values.items())

    def _line(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            pos = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%) eta {eta:.0f}s"
        else:
            pos = f"{self.n}"
        return f"{self.desc}: {pos} {rate:.2f} it/s {elapsed:.0f}s {self.postfix}".rstrip()

    def __iter__(self) -> Iterator[T]:
        start = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if self.enabled and now - last >= self.interval:
                print(self._line(now - start), file=sys.stderr, flush=True)
                last = now
        if self.enabled:
            print(self._line(time.monotonic() - start), file=sys.stderr, flush=True)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Any:
    """A progress-reporting wrapper with `set_postfix`; tqdm when available and stderr is a terminal."""
    if _tqdm is not None and enabled and sys.stderr.isatty():
        return _tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
    return SimpleProgress(iterable, total=total, desc=desc, enabled=enabled)
