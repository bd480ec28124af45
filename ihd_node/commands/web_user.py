"""`ihd-node web-user FILE USER`: add or replace one user of the console's users file."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Any

from ihd_node.errors import UserError
from ihd_node.web.server import hash_password


def web_user_command(args: Any) -> int:
    """`ihd-node web-user FILE USER`: add or replace one user of the console's users file."""
    if not args.user or ":" in args.user or any(c.isspace() for c in args.user):
        raise UserError("the user name must be non-empty, without ':' or spaces")
    password = getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if len(password) < 8:
        raise UserError("the password is shorter than 8 characters; choose a longer one")
    path = Path(args.file)
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if line.partition(":")[0] != args.user] + [f"{args.user}:{hash_password(password)}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{args.user} written to {path}; the node reads the file when it starts")
    return 0
