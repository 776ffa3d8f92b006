"""A hand-written equivalent of the `.cog/openapi_schema.json` that `cog build` (the Go CLI) writes.

Built from run()'s signature and Input() declarations the way Cog lays it out (an `Input` object schema; choices
as an enum schema referenced with allOf; ge/le as minimum/maximum; Path as a uri string), so the Cog server can be
run with schema validation on, without Docker or the Go CLI.
"""

from __future__ import annotations

import inspect
import pathlib
import typing
from typing import Any

from cog.input import FieldInfo

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def input_schema(run: Any) -> dict:
    """The OpenAPI document of one run() method (wrapped by validate_inputs or not)."""
    run = inspect.unwrap(run)
    hints = typing.get_type_hints(run)
    properties: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    required = []
    for order, param in enumerate(list(inspect.signature(run).parameters.values())[1:]):
        field: FieldInfo = param.default
        hint = hints[param.name]
        args = [t for t in typing.get_args(hint) if t is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        base = args[0] if nullable else hint
        prop: dict[str, Any] = {"title": param.name.replace("_", " ").title(), "x-order": order}
        if field.description:
            prop["description"] = field.description
        if issubclass(base, pathlib.Path):
            prop.update(type="string", format="uri")
        else:
            prop["type"] = JSON_TYPES[base]
        if nullable:
            prop["nullable"] = True
        if field.choices is not None:
            schemas[param.name] = {"title": param.name, "description": "An enumeration.", "enum": field.choices,
                                   "type": prop.pop("type")}  # fmt: skip
            prop = {"allOf": [{"$ref": f"#/components/schemas/{param.name}"}], **prop}
        if field.ge is not None:
            prop["minimum"] = field.ge
        if field.le is not None:
            prop["maximum"] = field.le
        if field.default is not None:
            prop["default"] = field.default
        elif not nullable:
            required.append(param.name)
        properties[param.name] = prop
    schemas["Input"] = {"type": "object", "title": "Input", "properties": properties, "required": required}
    schemas["Output"] = {"type": "string", "format": "uri", "title": "Output"}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": schemas},
    }
