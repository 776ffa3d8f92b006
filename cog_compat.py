"""Cog 0.23.1 compatibility: input files downloaded into one folder of ours, never left behind.

Cog's ``URLPath.convert`` leaves its temporary file behind when a download fails (a 404 leaves an empty file) and
when the prediction is cancelled during the download (the file is complete but Cog no longer deletes it).
``install()`` (called by each predictor's ``setup()``) replaces it with a copy that downloads into a folder of our
own and removes the file if the download fails; ``remove_stale_inputs`` (run before each prediction by
``inputs.validate_inputs``) deletes what earlier predictions left there. Importing this module changes nothing.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from cog import Path
from cog.types import URLPath

_input_dir: pathlib.Path | None = None


def install() -> None:
    """Replace Cog's URLPath.convert (once per process) with one that downloads into our input folder."""
    global _input_dir
    if _input_dir is None:
        _input_dir = pathlib.Path(tempfile.mkdtemp(prefix="predict-inputs-"))
        URLPath.convert = _download_input


def _download_input(self: URLPath) -> pathlib.Path:
    """Cog's URLPath.convert (cog 0.23.1), downloading into our folder and removing the file if the download fails."""
    if self._path is None:
        with tempfile.NamedTemporaryFile(suffix=self.filename, dir=_input_dir, delete=False) as dest:
            try:
                shutil.copyfileobj(self.fileobj, dest)
            except BaseException:
                pathlib.Path(dest.name).unlink()
                raise
        self._path = Path(dest.name)
    return self._path


def remove_stale_inputs(keep: Iterable[Any]) -> None:
    """Delete the downloads earlier predictions left behind: all in our folder but this prediction's own inputs.

    Safe because a sync run() serves one prediction at a time. Does nothing before install().
    """
    if _input_dir is None:
        return
    keep = set(keep)
    for path in _input_dir.iterdir():
        if path not in keep:
            path.unlink(missing_ok=True)


def input_dir() -> pathlib.Path | None:
    """Where input files are downloaded (None before install())."""
    return _input_dir
