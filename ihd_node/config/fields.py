"""Value types of the config with their own messages (AE titles, ports, hosts, networks, regular
expressions, paths), the strict base section and `setting`, the field helper that carries each key's
meaning and example into error messages and docs/configuration.md."""

from __future__ import annotations

import ipaddress
import re
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


def _ae_title(value: str) -> str:
    # Leading/trailing spaces are not significant in the AE VR (PS3.5 6.2); compare stripped titles.
    title = value.strip(" ")
    if not title:
        raise ValueError("is empty or all spaces (an AE title has 1-16 characters)")
    if len(title) > 16:
        raise ValueError(f"is {len(title)} characters long (an AE title has at most 16)")
    if "\\" in title or any(ord(c) < 32 or ord(c) == 127 for c in title):
        raise ValueError("contains a backslash or a control character, which AE titles may not")
    if not title.isascii():
        raise ValueError("contains non-ASCII characters, which AE titles may not")
    return title


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("is not a port number (1-65535)")
    return value


def _host(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give a host name or IP address")
    return value.strip()


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("is not an IP address or CIDR network") from None
    return value.strip()


def _regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None
    return value


def named_once(items: list[Any], what: str) -> list[Any]:
    """`items` unchanged when no two share a `name`; else the error naming the first repeated one."""
    names = [item.name for item in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"name `{dupes[0]}` is used twice; give each {what} its own name")
    return items


def _relative_to_config(value: Path | None, info: ValidationInfo) -> Path | None:
    # Relative paths in a file mean "next to the file", not "wherever the service was started from".
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


def existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    value = _relative_to_config(value, info)
    if value is not None and (info.context or {}).get("check_files") and not value.is_file():
        raise ValueError("does not exist or is not a file; give the path of an existing file")
    return value


# Numbers and switches are strict so that `port: yes` or `gradcam: 1` are errors, not silent coercions.
Int = Annotated[int, Field(strict=True)]


Num = Annotated[float, Field(strict=True)]


Bool = Annotated[bool, Field(strict=True)]


AETitle = Annotated[str, Field(strict=True), AfterValidator(_ae_title)]


Port = Annotated[int, Field(strict=True), AfterValidator(_port)]


Host = Annotated[str, Field(strict=True), AfterValidator(_host)]


Network = Annotated[str, Field(strict=True), AfterValidator(_network)]


Regex = Annotated[str | None, AfterValidator(_regex)]


LocalPath = Annotated[Path, AfterValidator(_relative_to_config)]


FilePath = Annotated[Path | None, AfterValidator(existing_file)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def setting(default: Any = ..., doc: str = "", example: Any = None, **kw: Any) -> Any:
    """A Field with its meaning and one example; both feed error messages and docs/configuration.md."""
    examples = [example] if example is not None else None
    if callable(default) and not isinstance(default, (str, int, float, Path)):
        return Field(default_factory=default, description=doc, examples=examples, **kw)
    return Field(default, description=doc, examples=examples, **kw)


def tagged_models(annotation: Any) -> dict[str, type[BaseModel]]:
    """{tag: model} of a discriminated union inside an annotation (e.g. `list[AnyDestination]`), else {}.
    pydantic puts the tag into an error's location (`destinations.0.hl7.port`): the tag picks the model."""
    found: dict[str, type[BaseModel]] = {}
    if typing.get_origin(annotation) is Annotated:
        inner, *meta = typing.get_args(annotation)
        tag = next((m.tag for m in meta if type(m).__name__ == "Tag"), None)
        if tag is not None and isinstance(inner, type) and issubclass(inner, BaseModel):
            return {str(tag): inner}
    for arg in typing.get_args(annotation):
        found.update(tagged_models(arg))
    return found


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[Destination]` or `InboundTLS | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None
