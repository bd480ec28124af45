"""`ihd-node web-user FILE USER [--role ROLE]`: add or replace one user of the console's users file."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

from ihd_node.errors import UserError
from ihd_node.web.auth import ROLES, hash_password, read_users, write_user


def web_user_command(args: Any) -> int:
    """Write `USER:ROLE:pbkdf2_sha256$...`; without --role a user keeps the role they have (new ones: viewer)."""
    if not args.user or ":" in args.user or any(c.isspace() for c in args.user):
        raise UserError("the user name must be non-empty, without ':' or spaces")
    path = Path(args.file)
    known = read_users(path) if path.exists() else {}
    role = args.role or (known[args.user].role if args.user in known else "viewer")
    if role not in ROLES:
        raise UserError(f"--role {role} is not one of {', '.join(ROLES)}")
    password = getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if len(password) < 8:
        raise UserError("the password is shorter than 8 characters; choose a longer one")
    write_user(path, args.user, role, hash_password(password))
    print(f"{args.user} ({role}) written to {path}; the node reads the file when it starts")
    return 0
