"""The predictors' inputs as `cog build` sees them: its schema generator reads the source statically.

Cog 0.23 builds the OpenAPI schema with a static parser (tree-sitter), not by importing the code. It only resolves
Input() calls written in the predictor's own file, with literal arguments (or module-level literal lists): an Input
imported from another module, `list(SOME_DICT)` or `2**32 - 1` fail the build or silently drop the constraint, and an
implicitly concatenated description comes out garbled. Hence the inputs both models take are written out in each
predictor, and checked here to be identical.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from pathlib import Path

import pytest

import predict_i2v
import predict_v2v

ROOT = Path(__file__).resolve().parent.parent
PREDICTORS = ["predict_i2v.py", "predict_v2v.py"]
SHARED = ["prompt", "negative_prompt", "sizing_strategy", "seed"]


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


def is_static(value: ast.expr, literals: set[str]) -> bool:
    if isinstance(value, ast.Name):
        return value.id in literals
    try:
        ast.literal_eval(value)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("filename", PREDICTORS)
def test_every_input_is_readable_by_the_static_schema_parser(filename: str) -> None:
    path = ROOT / filename
    source = path.read_text()
    module, args, defaults = run_parameters(path)
    literals = module_literals(module)
    for arg, default in zip(args, defaults, strict=True):
        assert arg.annotation is not None, f"{arg.arg} has no type annotation"
        assert isinstance(default, ast.Call) and getattr(default.func, "id", None) == "Input", (
            f"{arg.arg}: the default must be an Input(...) call written in {filename}"
        )
        for keyword in default.keywords:
            assert is_static(keyword.value, literals), f"{arg.arg}: {keyword.arg}= is not a literal"
            if keyword.arg == "description":
                segment = ast.get_source_segment(source, keyword.value) or ""
                strings = [t for t in tokenize.generate_tokens(io.StringIO(segment).readline) if t.type == 3]
                assert len(strings) == 1, f"{arg.arg}: description must be one string literal, not concatenated"


def signature_defaults(run: object) -> dict[str, object]:
    parameters = inspect.signature(inspect.unwrap(run)).parameters  # type: ignore[arg-type]
    return {name: (p.annotation, p.default) for name, p in parameters.items()}


@pytest.mark.parametrize("name", SHARED)
def test_inputs_both_models_take_are_declared_identically(name: str) -> None:
    i2v, v2v = signature_defaults(predict_i2v.Predictor.run), signature_defaults(predict_v2v.Predictor.run)
    assert i2v[name] == v2v[name]
