"""The modules' layering (README, Layout): each imports only modules below it, so a lower one never reaches up."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Highest first. The predictors are the top: nothing imports them.
LAYERS = ["cogvideox", "lora", "pipelines", "weights", "downloads", "media", "inputs", "reporting"]


def project_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules & ({p.stem for p in ROOT.glob("*.py")})


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == set(LAYERS) | {p.stem for p in ROOT.glob("predict_*.py")}


def test_modules_import_only_lower_layers() -> None:
    for level, name in enumerate(LAYERS):
        reaching_up = project_imports(ROOT / f"{name}.py") - set(LAYERS[level + 1 :])
        assert not reaching_up, f"{name}.py imports {sorted(reaching_up)}, which are not below it"
    for predictor in ROOT.glob("predict_*.py"):
        assert project_imports(predictor) <= set(LAYERS), predictor.name
