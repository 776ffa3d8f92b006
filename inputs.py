"""Inputs: validation against the Input() declarations (one place for every predictor), seeds, input files."""

from __future__ import annotations

import functools
import inspect
import logging
import pathlib
import random
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterable
from typing import Any

from cog import Path
from cog.input import FieldInfo
from cog.types import URLPath

logger = logging.getLogger("predict")


class InputError(ValueError):
    """A bad input: the message names the input and what is allowed, and is shown to the user as is."""


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
    before this runs. Before the run it also deletes input downloads earlier predictions left behind.
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
        _remove_stale_inputs(keep=values.values())
        return run(self, **values)

    return wrapper


def resolve_seed(seed: int | None) -> int:
    """The seed to use: the given one, or a random one. Logged either way so a result can be reproduced."""
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**32 - 1)
    logger.info("Using seed: %d", seed)
    return seed


_INPUT_DIR = Path(tempfile.mkdtemp(prefix="predict-inputs-"))


def _download_input(self: URLPath) -> pathlib.Path:
    """Cog's URLPath.convert (cog 0.23.1) downloading into _INPUT_DIR, and removing the file if the download fails.

    Cog's own leaves its temp file behind when a download fails (a 404 leaves an empty file) and when the prediction
    is cancelled during the download (the file is complete but Cog no longer deletes it). The first is handled here,
    the second by _remove_stale_inputs() at the next prediction.
    """
    if self._path is None:
        with tempfile.NamedTemporaryFile(suffix=self.filename, dir=_INPUT_DIR, delete=False) as dest:
            try:
                shutil.copyfileobj(self.fileobj, dest)
            except BaseException:
                pathlib.Path(dest.name).unlink()
                raise
        self._path = Path(dest.name)
    return self._path


URLPath.convert = _download_input


def _remove_stale_inputs(keep: Iterable[Any]) -> None:
    """Delete the downloads earlier predictions left behind: all in _INPUT_DIR but this prediction's own inputs.

    Safe because a sync run() serves one prediction at a time.
    """
    for path in _INPUT_DIR.iterdir():
        if path not in keep:
            path.unlink(missing_ok=True)
