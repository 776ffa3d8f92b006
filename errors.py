"""The errors a caller or an operator reads: each message is one sentence, shown as is.

- InputError: a prediction's input is bad (it names the input and what is allowed). The caller can fix it.
- WeightsError: a model's weights could not be fetched or loaded at setup (it names the environment variable).
- ServiceError: the server itself could not serve a valid request (a full disk, say). Not the caller's fault.
"""

from __future__ import annotations


class InputError(ValueError):
    """A bad input: the message names the input and what is allowed."""


class WeightsError(RuntimeError):
    """The weights could not be fetched, or what was fetched is not a usable diffusers folder."""


class ServiceError(RuntimeError):
    """The server could not serve a valid request (its disk, its memory): the message says so, not the caller's."""
