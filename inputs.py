"""Inputs: validation against the Input() declarations (one place for every predictor), and seeds."""

from __future__ import annotations

import functools
import inspect
import pathlib
import random
import typing
from collections.abc import Callable
from typing import Any

from cog import Path
from cog.input import FieldInfo

from cog_compat import remove_stale_inputs
from errors import InputError
from reporting import logger


def _check(name: str, value: Any, field: FieldInfo, hint: Any) -> Any:
    """Check one input against its type and its Input() constraints; return the value to use."""
    if isinstance(value, FieldInfo):  # not given: Cog without a schema passes the Input() object itself
        value = value.default
    optional = type(None) in typing.get_args(hint)
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise InputError(f"Missing input `{name}`: it is required.")
    if base is Path:
        if not isinstance(value, pathlib.Path):
            raise InputError(f"Invalid input `{name}`: expected a file or URL, got {value!r}.")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise InputError(f"Invalid input `{name}`: expected {base.__name__}, got {value!r}.")
    if field.choices is not None and value not in field.choices:
        allowed = ", ".join(str(c) for c in field.choices)
        raise InputError(f"Invalid input `{name}`: must be one of {allowed} (got {value!r}).")
    too_low = field.ge is not None and value < field.ge
    too_high = field.le is not None and value > field.le
    if too_low or too_high:
        bounds = [f">= {field.ge}"] * (field.ge is not None) + [f"<= {field.le}"] * (field.le is not None)
        raise InputError(f"Invalid input `{name}`: must be {' and '.join(bounds)} (got {value!r}).")
    if field.max_length is not None and len(value) > field.max_length:
        raise InputError(f"Invalid input `{name}`: at most {field.max_length} characters (got {len(value)}).")
    return value


def validate_inputs(run: Callable[..., Any]) -> Callable[..., Any]:
    """Check every input of `run` against its signature before running it.

    The Input() declarations are the single source of truth. Without an OpenAPI schema (a server started without
    `cog build`) Cog checks nothing and passes the Input() objects for inputs not given: every check and default
    happens here. With one, Cog rejects wrong types and out-of-range values itself (HTTP 422, its own wording)
    before this runs. Before the run it also deletes input downloads earlier predictions left behind (cog_compat).
    """
    params = list(inspect.signature(run).parameters.values())[1:]
    hints = typing.get_type_hints(run)

    @functools.wraps(run)
    def wrapper(self: Any, **kwargs: Any) -> Any:
        unknown = sorted(set(kwargs) - {p.name for p in params})
        if unknown:
            allowed = ", ".join(p.name for p in params)
            raise InputError(f"Unknown input `{unknown[0]}`: allowed inputs are {allowed}.")
        values = {p.name: _check(p.name, kwargs.get(p.name, p.default), p.default, hints[p.name]) for p in params}
        remove_stale_inputs(keep=values.values())
        return run(self, **values)

    return wrapper


def check_steps_run(*, strength: float, num_inference_steps: int) -> None:
    """Video-to-video runs int(steps x strength) of its steps (diffusers' rule): at least one must run."""
    if int(num_inference_steps * strength) < 1:
        raise InputError(
            f"Invalid inputs `strength` and `num_inference_steps`: strength x steps must be at least 1 "
            f"(got {strength} x {num_inference_steps})."
        )


def resolve_seed(seed: int | None) -> int:
    """The seed to use: the given one, or a random one. Logged either way so a result can be reproduced."""
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**32 - 1)
    logger.info("Using seed: %d", seed)
    return seed
