"""What a prediction reports back: its logs, per-step progress, timed phases and metrics."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cog import current_scope

logger = logging.getLogger("predict")


def configure_logging() -> None:
    """Send our INFO logs to stdout, which Cog shows as the prediction's logs."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def record_metric(key: str, value: float) -> None:
    current_scope().record_metric(key, value)


def record_setup_metrics(timings: dict[str, float]) -> None:
    """Report setup's timings with each prediction (setup itself runs outside any prediction)."""
    for key, value in timings.items():
        record_metric(f"setup.{key}", value)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase of a prediction as the metric `timing.<name>` (out-of-memory: memory.GpuMemory.fit)."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    record_metric(f"timing.{name}", seconds)
    logger.info("%s took %.2f s", name.capitalize(), seconds)


class StepLogger:
    """Logs each denoising step with its speed; hooks into both diffusers callback styles."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start = time.perf_counter()

    def on_step(self, step: int, *_: Any) -> None:
        """The legacy `callback(step, timestep, latents)`."""
        seconds = (time.perf_counter() - self.start) / (step + 1)
        logger.info("Denoising step %d/%d (%.2f s/step)", step + 1, self.total_steps, seconds)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """`callback_on_step_end(pipe, step, timestep, callback_kwargs)`."""
        self.on_step(step)
        return callback_kwargs
