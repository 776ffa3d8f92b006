"""The Cog configs: one per model, each building what the tests ran (pinned SDK, a CUDA for the pinned torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"cog.yaml": "predict_i2v.py", "cog-i2v15.yaml": "predict_i2v15.py", "cog-v2v.yaml": "predict_v2v.py"}
TORCH_CUDA = {"2.13.0": "13.0"}  # the CUDA that PyPI's torch wheel is built for (its torch/version.py)


def pinned(requirements: str, package: str) -> str:
    (version,) = re.findall(rf"^{package}==([\w.]+)", (ROOT / requirements).read_text(), re.MULTILINE)
    return version


@pytest.mark.parametrize("name", CONFIGS)
def test_config_pins_what_the_tests_ran(name: str) -> None:
    config = yaml.safe_load((ROOT / name).read_text())
    build = config["build"]
    assert config["run"] == f"{CONFIGS[name]}:Predictor" and (ROOT / CONFIGS[name]).is_file()
    assert build["sdk_version"] == pinned(
        "requirements-dev.txt", "cog"
    )  # cog_compat.py patches this version's internals
    # cog's CUDA table stops before the pinned torch: without build.cuda, `cog build` refuses to start.
    assert build["cuda"] == TORCH_CUDA[pinned("requirements.txt", "torch")]
    assert build["gpu"] is True and build["python_requirements"] == "requirements.txt"
    assert "predict" not in config  # the deprecated key


def test_every_predictor_has_a_config() -> None:
    assert sorted(CONFIGS.values()) == sorted(p.name for p in ROOT.glob("predict_*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_pget_is_pinned_to_a_release(name: str) -> None:
    (command,) = [c for c in yaml.safe_load((ROOT / name).read_text())["build"]["run"] if "pget" in c]
    assert re.search(r"/releases/download/v\d+\.\d+\.\d+/pget_", command), command  # never "latest"


def test_the_image_gets_code_not_caches() -> None:
    """`cog build` copies the whole folder: a local `cog predict` fills model_cache/ with tens of GB."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git/", ".venv/", "model_cache/", "*.tar", "*.mp4"} <= set(ignored)
