"""Run a command without root's power to write anywhere, for the tests of what a folder's permissions refuse.

Not root: the command as it is. Root: as the `nobody` user when that user can run this Python (as tests/pg.py
runs PostgreSQL as `postgres`); where it cannot (an interpreter under root's 0700 home, as pyenv and many CI
images put it) as root stripped of the capabilities that bypass file modes (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH, CAP_FOWNER), which makes the kernel check the folder's mode bits like any user's.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Sequence

UNPRIVILEGED_USER = "nobody"
STRIP = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@functools.cache
def _nobody_can_run_python() -> bool:
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return False
    if shutil.which("runuser") is None:
        return False
    probe = subprocess.run(["runuser", "-u", UNPRIVILEGED_USER, "--", sys.executable, "-c", "import ihd_node"],
                           capture_output=True, timeout=60, env=os.environ.copy())
    return probe.returncode == 0


def unprivileged(command: Sequence[str]) -> list[str]:
    """`command` prefixed so that it runs without root's right to ignore file modes."""
    if os.geteuid() != 0:
        return list(command)
    if _nobody_can_run_python():
        return ["runuser", "-u", UNPRIVILEGED_USER, "--", *command]
    return [*STRIP, *command]
