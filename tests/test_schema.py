"""The predictors' inputs as `cog build` sees them.

Cog 0.23 builds the OpenAPI schema with a static parser (tree-sitter), not by importing the code: it resolves only
Input() calls written in the predictor's own file, with literal arguments; a module-level name works in choices=,
default= and description= only (in ge=/le= it is silently dropped). tests/schemas/ holds what that parser produced
for each predictor (script/schemas regenerates them); the Cog server tests run with them as .cog/openapi_schema.json.
Here: every Input() is statically readable, the golden schemas still say what the Input() declarations say, and
the inputs the models share are declared identically.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import tokenize
import typing
from pathlib import Path
from typing import Any

import pytest
from cog.input import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
PREDICTORS = ["predict_i2v", "predict_i2v15", "predict_v2v", "predict_t2v"]
COGVIDEOX = ["predict_i2v", "predict_i2v15", "predict_t2v"]
SHARED = {  # inputs declared in several predictors, which must be identical there
    "prompt": PREDICTORS,
    "negative_prompt": PREDICTORS,
    "sizing_strategy": PREDICTORS,
    "seed": PREDICTORS,
    "num_inference_steps": COGVIDEOX,
    "guidance_scale": COGVIDEOX,
    "use_dynamic_cfg": COGVIDEOX,
    "scheduler": COGVIDEOX,
    "lora_url": COGVIDEOX,
    "lora_scale": COGVIDEOX,
    "fps": ["predict_i2v", "predict_t2v"],  # CogVideoX 1.0's 8 fps (1.5 makes 16, zeroscope keeps the input's)
}
SHARED_BUT_DEFAULT = {"interpolation": PREDICTORS}  # the same input, each model with its own default
NAME_ALLOWED_IN = {"choices", "default", "description"}  # where cog's parser resolves a module-level name
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def run_parameters(path: Path) -> tuple[ast.Module, list[ast.arg], list[ast.expr | None]]:
    module = ast.parse(path.read_text())
    predictor = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    run = next(n for n in predictor.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    args = run.args.args[1:]
    defaults = [None] * (len(args) - len(run.args.defaults)) + list(run.args.defaults)
    return module, args, defaults


def module_literals(module: ast.Module) -> set[str]:
    """Names assigned a literal at module level: the only names the static parser can resolve."""
    names = set()
    for node in module.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ast.literal_eval(node.value)
                names.add(node.targets[0].id)
            except ValueError:
                pass
    return names


@pytest.mark.parametrize("module", PREDICTORS)
def test_every_input_is_readable_by_the_static_schema_parser(module: str) -> None:
    path = ROOT / f"{module}.py"
    source = path.read_text()
    tree, args, defaults = run_parameters(path)
    literals = module_literals(tree)
    for arg, default in zip(args, defaults, strict=True):
        assert arg.annotation is not None, f"{arg.arg} has no type annotation"
        assert isinstance(default, ast.Call) and getattr(default.func, "id", None) == "Input", (
            f"{arg.arg}: the default must be an Input(...) call written in {module}.py"
        )
        for keyword in default.keywords:
            value = keyword.value
            if isinstance(value, ast.Name):
                assert keyword.arg in NAME_ALLOWED_IN, f"{arg.arg}: cog build drops a name in {keyword.arg}="
                assert value.id in literals, f"{arg.arg}: {value.id} is not a module-level literal"
            else:
                ast.literal_eval(value)  # raises for anything but a literal
            if keyword.arg == "description":
                segment = ast.get_source_segment(source, value) or ""
                strings = [t for t in tokenize.generate_tokens(io.StringIO(segment).readline) if t.type == 3]
                assert len(strings) <= 1, f"{arg.arg}: description must be one string literal, not concatenated"


def declared(module: str) -> dict[str, tuple[Any, FieldInfo]]:
    run = importlib.import_module(module).Predictor.run
    hints = typing.get_type_hints(inspect.unwrap(run))
    parameters = list(inspect.signature(inspect.unwrap(run)).parameters.values())[1:]
    return {p.name: (hints[p.name], p.default) for p in parameters}


def expected_property(hint: Any, field: FieldInfo, order: int) -> dict[str, Any]:
    """What the golden schema must say of one input, from its annotation and Input() declaration."""
    nullable = type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if nullable else hint
    prop: dict[str, Any] = {"x-order": order, "description": field.description}
    prop["type"] = "string" if base.__name__ == "Path" else JSON_TYPES[base]
    if nullable:
        prop["nullable"] = True
    if field.choices is not None:
        prop["enum"] = field.choices
    if field.ge is not None:
        prop["minimum"] = field.ge
    if field.le is not None:
        prop["maximum"] = field.le
    if field.default is not None or nullable:
        prop["default"] = field.default
    return prop


def golden_property(schema: dict, name: str) -> dict[str, Any]:
    schemas = schema["components"]["schemas"]
    prop = dict(schemas["Input"]["properties"][name])
    keys = ["x-order", "description", "type", "nullable", "minimum", "maximum", "default"]
    if "allOf" in prop:  # choices: an enum schema of their own
        enum = schemas[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]
        prop.update(type=enum["type"], enum=enum["enum"])
        keys.append("enum")
    return {key: prop[key] for key in keys if key in prop}


@pytest.mark.parametrize("module", PREDICTORS)
def test_golden_schema_matches_the_inputs(module: str) -> None:
    """Fails when an Input() changed and tests/schemas/ was not regenerated with script/schemas."""
    schema = json.loads((ROOT / "tests" / "schemas" / f"{module}.json").read_text())
    inputs = declared(module)
    golden = schema["components"]["schemas"]["Input"]
    assert list(golden["properties"]) == list(inputs), "inputs added, removed or reordered: run script/schemas"
    for order, (name, (hint, field)) in enumerate(inputs.items()):
        assert golden_property(schema, name) == expected_property(hint, field, order), f"{name}: run script/schemas"
    required = [name for name, (hint, field) in inputs.items() if field.default is None and hint is not type(None)]
    required = [name for name in required if type(None) not in typing.get_args(inputs[name][0])]
    assert sorted(golden.get("required", [])) == sorted(required)
    assert schema["components"]["schemas"]["Output"] == {"format": "uri", "title": "Output", "type": "string"}


@pytest.mark.parametrize("name", SHARED)
def test_inputs_models_share_are_declared_identically(name: str) -> None:
    declarations = {module: declared(module)[name] for module in SHARED[name]}
    first = next(iter(declarations.values()))
    for module, (hint, field) in declarations.items():
        assert hint == first[0], module
        assert vars(field) == vars(first[1]), module


@pytest.mark.parametrize("name", SHARED_BUT_DEFAULT)
def test_inputs_models_share_differ_only_in_their_default(name: str) -> None:
    declarations = {module: declared(module)[name] for module in SHARED_BUT_DEFAULT[name]}
    first = next(iter(declarations.values()))
    for module, (hint, field) in declarations.items():
        assert hint == first[0], module
        assert {**vars(field), "default": None} == {**vars(first[1]), "default": None}, module
