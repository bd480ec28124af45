"""The key reference table of docs/configuration.md, generated from the models."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from ihd_node.config.fields import model_in, tagged_models
from ihd_node.config.sections import Config


def reference_markdown() -> str:
    """The key reference table of docs/configuration.md, generated from the models so it cannot drift."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = model_in(info.annotation)
            is_list = typing.get_origin(info.annotation) is list
            if sub is not None and not is_list:
                walk(sub, f"{key}.")
                continue
            kinds = tagged_models(info.annotation)
            if kinds:  # a list of a discriminated union: each kind's keys under its own heading row
                rows.append(f"| `{key}` | list of mappings | `[]` | {info.description} |")
                for tag, kind_model in kinds.items():
                    walk(kind_model, f"{key}[kind={tag}].")
                continue
            if sub is not None:
                rows.append(f"| `{key}` | list of mappings | `[]` | {info.description} |")
                walk(sub, f"{key}[].")
                continue
            if info.is_required():
                default = "required"
            else:
                value = info.get_default(call_default_factory=True)
                default = f"`{json.dumps(value if not isinstance(value, Path) else str(value))}`"
            rows.append(f"| `{key}` | {_type_name(info.annotation)} | {default} | {info.description} |")

    walk(Config, "")
    return "\n".join(rows) + "\n"


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    names = {
        int: "integer",
        float: "number",
        bool: "true/false",
        str: "text",
        Path: "path",
        type(None): "null",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
