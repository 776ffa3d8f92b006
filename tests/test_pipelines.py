"""pipelines.speed_up: what TORCH_COMPILE and fusing do to a denoiser (no GPU: the CUDA check is faked, and
torch.compile is recorded rather than run)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines import speed_up


class Denoiser(torch.nn.Module):
    """A stand-in with CogVideoX's shape of things: repeated blocks and a fuse_qkv_projections method."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        self.fused = False

    def fuse_qkv_projections(self) -> None:
        self.fused = True


@pytest.mark.parametrize(
    ("cuda", "compile_blocks", "fuse"),
    [(True, True, True), (True, False, True), (False, True, True), (True, True, False)],
)
def test_compile_and_fuse_do_what_they_say(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, compile_blocks: bool, fuse: bool
) -> None:
    compiled: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = Denoiser()
    speed_up(model, fuse=fuse, compile_blocks=compile_blocks)
    assert model.fused == fuse
    # Each repeated block is compiled on its own (diffusers' compile_repeated_blocks rejects both models), only on CUDA.
    assert compiled == (list(model.transformer_blocks) if cuda and compile_blocks else [])
