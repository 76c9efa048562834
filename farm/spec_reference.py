"""The job spec reference (docs/SPEC.md), generated from the pydantic models themselves, so the reference
cannot drift from what `farm plan` accepts: `python -m farm.spec_reference > docs/SPEC.md`."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from farm.methods import REGISTRY
from farm.spec import JobSpec


def _name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # a checked str (Location, a tracking URI): shown as its base type
        return _name(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _models(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def _default(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        return f"`{value!r}`" if not isinstance(value, BaseModel) else "(defaults below)"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def _bounds(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (
            ("gt", ">"),
            ("ge", ">="),
            ("lt", "<"),
            ("le", "<="),
            ("min_length", "min length"),
            ("max_length", "max length"),
            ("pattern", "pattern"),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def render() -> str:
    seen: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [JobSpec, *REGISTRY.values()]
    while todo:
        model = todo.pop(0)
        if model in seen:
            continue
        seen.append(model)
        for f in model.model_fields.values():
            todo += [m for m in _models(f.annotation) if m not in seen]
    lines = [
        "# Job spec reference",
        "",
        "Generated from farm's pydantic models (`python -m farm.spec_reference`). Every model forbids unknown",
        "fields and types are strict: a boolean is `true`/`false`, a number is not a string, nothing is coerced.",
        "s3:// and hf:// locations and the tracking URI are checked as written. Relative paths resolve against",
        "the spec file's directory. `methods` entries are picked by their `method` field.",
        "",
    ]
    for model in seen:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## {model.__name__}", ""] + ([doc, ""] if doc and not doc.startswith("!!!") else [])
        lines += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}` | {_name(f.annotation)} | {_default(f)} | {_bounds(f)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
