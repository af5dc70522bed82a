"""Follow a task from Python (`RelayClient`), or in a terminal (`relay watch`)."""

from .client import (
    DEFAULT_URL,
    RelayClient,
    RelayError,
    RelayUnavailable,
    State,
    TaskFailed,
    TaskNotFound,
    TaskWatch,
    Unauthorized,
)

__all__ = [
    "DEFAULT_URL",
    "RelayClient",
    "RelayError",
    "RelayUnavailable",
    "State",
    "TaskFailed",
    "TaskNotFound",
    "TaskWatch",
    "Unauthorized",
]
