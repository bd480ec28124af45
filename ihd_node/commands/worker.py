"""`ihd-node worker --config FILE [--device cuda:N]`: one analysis worker of a multi-machine node."""

from __future__ import annotations

from typing import Any

from ihd_node.commands.serve import serve_command


def worker_command(args: Any) -> int:
    """`ihd-node worker --config FILE [--device cuda:N]`: analysis jobs from the queue, nothing else."""
    return serve_command(args, roles=["analyse"], device=getattr(args, "device", None))
