"""`ihd-node check-config FILE`: validate a config file without starting the node."""

from __future__ import annotations

from typing import Any

from ihd_node.config.checks import runtime_problems, summary
from ihd_node.config.load import ConfigError, load_config


def check_config_command(args: Any) -> int:
    """`ihd-node check-config FILE`: validate without starting; exit 0 when fine, 2 otherwise."""
    import sys

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"ihd-node check-config: error: {exc}", file=sys.stderr)
        return 2
    problems = runtime_problems(config)
    warnings, users_problem = users_file_notes(config)
    if users_problem:
        problems.append(users_problem)
    if problems:
        for line in problems:
            print(f"ihd-node check-config: error: {line}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    for line in summary(config):
        print(f"  {line}")
    for line in warnings:
        print(f"ihd-node check-config: warning: {line}", file=sys.stderr)
    return 0


def users_file_notes(config: Any) -> tuple[list[str], str | None]:
    """Warnings about the console's users file (lines from before roles) and why it cannot be read, if so."""
    from pathlib import Path

    from ihd_node.errors import UserError
    from ihd_node.web.auth import LEGACY_ROLE, read_users

    path = config.web.auth.users_file
    if path is None:
        return [], None
    try:
        users = read_users(Path(path))
    except (OSError, UserError) as exc:
        return [], str(exc)
    return [f"web.auth.users_file {path}: {u.user} has no role (a `user:hash` line from before roles), read as "
            f"{LEGACY_ROLE}; give it one with `ihd-node web-user {path} {u.user} --role viewer|operator|admin`"
            for u in users.values() if u.legacy], None
