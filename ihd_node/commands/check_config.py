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
    if problems:
        for line in problems:
            print(f"ihd-node check-config: error: {line}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    for line in summary(config):
        print(f"  {line}")
    return 0
