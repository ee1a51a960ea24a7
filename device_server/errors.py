"""Domain errors of the measurement daemon, each tied to the gRPC status it is answered with.

Plain code raises these; the servicer maps them to statuses in one place (service.py).
"""

from __future__ import annotations

import signal

__all__ = [
    "describe_exit",
    "MeasurementError",
    "InvalidConfigError",
    "UnavailableProviderError",
    "ResourceLimitError",
    "ModelNotFoundError",
    "DeadlineError",
]


class MeasurementError(Exception):
    """Base class. `code` is the gRPC status code name the daemon answers with."""

    code = "INTERNAL"


class InvalidConfigError(MeasurementError, ValueError):
    """The request describes something that cannot be built (bad sizes, bad model bytes)."""

    code = "INVALID_ARGUMENT"


class UnavailableProviderError(MeasurementError):
    """The device lacks the execution provider asked for."""

    code = "FAILED_PRECONDITION"


class ResourceLimitError(MeasurementError):
    """The request would exceed the daemon's memory, time or queue caps."""

    code = "RESOURCE_EXHAUSTED"


class ModelNotFoundError(MeasurementError):
    """A model referenced by hash was never uploaded."""

    code = "NOT_FOUND"


class DeadlineError(MeasurementError):
    """The client's deadline would pass before the measurement could finish."""

    code = "DEADLINE_EXCEEDED"


def describe_exit(code: int | None, unknown: str = "died (exit status unknown)") -> str:
    """A process's exit code as the words an error message needs: 'was killed by SIGKILL',
    'exited with status 3', or `unknown` when there is no code (e.g. the process hangs)."""
    if code is None:
        return unknown
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
