"""script/demo: which weights it runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo() -> Any:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "script" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_the_real_weights_are_not_even_asked_for(demo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(demo, "reachable", lambda url: asked.append(url) or True)
    assert "no CUDA" in demo.tiny_because("https://weights.example/i2v.tar", cuda=False, asked=False)
    assert asked == []  # no request, so no 20 GB download and no 5B model in float32 on the CPU
    assert demo.tiny_because("https://weights.example/i2v.tar", cuda=False, asked=True) is None  # --real-weights
    assert demo.tiny_because("https://weights.example/i2v.tar", cuda=True, asked=False) is None
    assert asked == ["https://weights.example/i2v.tar"] * 2


def test_unreachable_real_weights_fall_back_to_tiny(demo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "reachable", lambda url: False)
    assert "unreachable" in demo.tiny_because("https://weights.example/i2v.tar", cuda=True, asked=False)
