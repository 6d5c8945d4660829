"""Typed plugin options: each plugin declares a pydantic model of the options it accepts.

A plugin passes its model when it registers (``register(name, factory, options=MyOptions)``)
or gives its factory an inner ``Options`` class, as simonw/llm models do. The core validates
a tier's options against these models when the manifest is resolved, so a misspelt or
ill-typed option is a manifest error before anything loads.

An option may name another plugin (the paged loader names a reader, a cache policy and a
prefetcher): declare it with :func:`plugin_ref`, and the core checks that name and validates
the referenced plugin's options too.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

#: JSON-schema keys that mark an option naming another plugin.
PLUGIN_KIND_KEY = "x-plugin-kind"
PLUGIN_OPTIONS_KEY = "x-plugin-options"


class PluginOptions(BaseModel):
    """Base class of every plugin's options: unknown keys are errors, never ignored.

    Strict: ``direct = "yes"`` is refused rather than read as true (an int still fills a float).
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class NoOptions(PluginOptions):
    """The options of a plugin that accepts none."""


def plugin_ref(kind: str, default: str | None, *, options: str, description: str) -> Any:
    """A field that names a plugin of ``kind``; its options live in the field named ``options``."""
    return Field(default=default, description=description,
                 json_schema_extra={PLUGIN_KIND_KEY: kind, PLUGIN_OPTIONS_KEY: options})


def plugin_refs(model: type[BaseModel]) -> Iterator[tuple[str, str, str]]:
    """(field, plugin kind, options field) for every plugin reference in ``model``."""
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and PLUGIN_KIND_KEY in extra:
            yield name, str(extra[PLUGIN_KIND_KEY]), str(extra[PLUGIN_OPTIONS_KEY])


def as_kwargs(options: BaseModel) -> dict[str, Any]:
    """The validated options as keyword arguments for a plugin's factory (nested values kept)."""
    return {name: getattr(options, name) for name in type(options).model_fields}


def _type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``dict``: how a type reads in a listing."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    origin = typing.get_origin(annotation) or annotation
    return getattr(origin, "__name__", str(origin))


def describe_options(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One row per option: name, type, default and description (for `outlier plugins --options`)."""
    rows = []
    for name, info in model.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({"name": name, "type": _type_name(info.annotation), "required": info.is_required(),
                     "default": default, "description": info.description or ""})
    return rows
