"""The modules' layering (README, Layout): each imports only modules below it, so a lower one never reaches up."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Highest first. The predictors are the top: nothing imports them.
LAYERS = [
    "cogvideox",
    "interpolation",
    "lora",
    "pipelines",
    "memory",
    "weights",
    "downloads",
    "media",
    "inputs",
    "reporting",
    "cog_compat",
    "errors",
]


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


def test_importing_shared_modules_changes_neither_cog_nor_the_file_system(tmp_path: Path) -> None:
    """Patches and temporary folders happen in a predictor's setup(), never on import."""
    script = f"""
import cog.types, tempfile
original = cog.types.URLPath.convert
for name in {LAYERS!r}:
    __import__(name)
assert cog.types.URLPath.convert is original, "a module patched Cog on import"
import cog_compat
cog_compat.install()
assert cog.types.URLPath.convert is not original
"""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    made = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert len(made) == 1 and made[0].startswith("predict-inputs-"), made  # only install() made a folder
