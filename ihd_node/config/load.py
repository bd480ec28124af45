"""Reading config.yaml into a Config. Errors become one `ConfigError` whose lines each name the key
path, the file, the bad value and the fix."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ihd_node.config.fields import model_in, tagged_models
from ihd_node.config.sections import Config
from ihd_node.errors import UserError


class ConfigError(UserError):
    """The config file is missing, not YAML, or holds an unknown key or a bad value."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key `{key}` appears twice in one section; keep one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _untagged(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """loc without the union tags pydantic inserts (`destinations.0.hl7.port` -> `destinations.0.port`)."""
    out: list[Any] = []
    model: type[BaseModel] | None = Config
    tags: dict[str, type[BaseModel]] = {}
    for part in loc:
        if isinstance(part, str) and part in tags:
            model, tags = tags[part], {}
            continue
        out.append(part)
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(str(part))
        tags = tagged_models(info.annotation) if info is not None else {}
        model = model_in(info.annotation) if info is not None else None
    return tuple(out)


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """(model holding the last key of loc, that key's FieldInfo or None); loc may hold union tags."""
    model: type[BaseModel] | None = Config
    tags: dict[str, type[BaseModel]] = {}
    for part in loc[:-1]:
        if isinstance(part, str) and part in tags:
            model, tags = tags[part], {}
            continue
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(str(part))
        tags = tagged_models(info.annotation) if info is not None else {}
        model = model_in(info.annotation) if info is not None else None
    last = loc[-1] if loc else None
    if model is None or not isinstance(last, str):
        return model, None
    return model, model.model_fields.get(last)


def _show(value: Any) -> str:
    # YAML spelling: "text", true/false, null.
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


_NOT_A = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "text",
    "list": "a list",
    "dict": "a mapping of keys to values",
    "model": "a mapping of keys to values",
}


def _describe(err: Mapping[str, Any], where: str) -> str:
    loc = tuple(err["loc"])
    key = _key_path(_untagged(loc)) or "(top level)"
    model, info = _field_at(loc)
    example = info.examples[0] if info is not None and info.examples else None
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys here: {', '.join(known)}"
        return f"unknown key `{key}` in {where}; {hint}"
    if kind == "union_tag_invalid":  # only destinations have kinds
        tag = err.get("ctx", {}).get("tag")
        known = str(err.get("ctx", {}).get("expected_tags", "")).replace("'", "")
        return (f"{key}.kind in {where}: {_show(tag)} is not a destination kind; use one of {known} "
                "(no kind = dicom)")
    if kind == "missing":
        leaf = loc[-1]
        fix = f"add it, e.g. `{leaf}: {_show(example)}`" if example is not None else "add it"
        return f"{key} in {where}: missing; {fix}"
    if kind == "value_error":
        reason = str(err["ctx"]["error"])
    elif kind.split("_")[0] in _NOT_A and kind.endswith(("_type", "_parsing", "_from_float")):
        reason = f"is not {_NOT_A[kind.split('_')[0]]}"
    else:
        msg = str(err["msg"])
        reason = msg.replace("Input should", "should", 1) if msg.startswith("Input should") else msg
    value = err.get("input")
    # Whole sections or lists of them are too long to echo; the key path says where to look.
    structured = isinstance(value, Mapping) or (
        isinstance(value, list) and any(isinstance(v, Mapping) for v in value)
    )
    shown = "" if structured else f"{_show(value)} "
    fix = f"; use e.g. {_show(example)}" if example is not None and ";" not in reason else ""
    return f"{key} in {where}: {shown}{reason}{fix}"


def _validate(data: Any, where: str, base_dir: Path | None, check_files: bool) -> Config:
    try:
        return Config.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        lines = [_describe(e, where) for e in exc.errors(include_url=False)]
        if len(lines) == 1:
            raise ConfigError(lines[0]) from None
        listing = "\n".join(f"  {line}" for line in lines)
        raise ConfigError(f"{len(lines)} problems in {where}:\n{listing}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError with key, file and fix on any problem."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; start from config.yaml of the ihd-node sources") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory; give the path of the config file itself") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied; make it readable by the ihd-node user") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text; save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        fix = "" if ";" in problem else "; fix the syntax there"
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}{fix}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections (node:, storage:, "
            f"database:, series:, destinations:, model:), not {type(data).__name__}"
        )
    config = _validate(data, where, path.resolve().parent, check_files=True)
    config._source = path
    return config


def default_config(tmpdir: str | Path, **sections: Any) -> Config:
    """A Config built in code (demo, tests): storage and database under tmpdir; sections override defaults,
    e.g. default_config(tmp, node={"port": 5104}, destinations=[{...}]). The web console takes any free port
    (many nodes run side by side in tests); `node.web.port` says which."""
    data: dict[str, Any] = {"storage": {"dir": str(tmpdir)}, "web": {"port": 0}}
    for name, value in sections.items():
        if isinstance(value, Mapping) and isinstance(data.get(name), Mapping):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return _validate(data, "default_config()", Path(tmpdir), check_files=False)
