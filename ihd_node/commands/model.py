"""`ihd-node model describe [NAME]`: what a checkpoint is, what it was trained on, how it decides."""

from __future__ import annotations

import json
from typing import Any

from ihd_node.errors import UserError
from ihd_node.model.describe import describe, summary_text


def model_command(args: Any) -> int:
    if getattr(args, "model_command", "describe") != "describe":
        raise UserError(f"unknown model command {args.model_command!r}; use `ihd-node model describe`")
    info = describe(args.name)
    print(json.dumps(info, indent=2) if args.json else summary_text(info))
    return 0
