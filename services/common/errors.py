"""Domain errors shared by every service.

Each maps to one gRPC status code (see `grpc_server.ErrorMappingInterceptor`) and one
OpenAI-shaped HTTP error (see the router's HTTP error handler). Domain code raises these
and never touches protobuf or HTTP types.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

# `field: reason`, where field is a path such as `messages[0].role`: how a field survives
# a hop over gRPC, whose status carries only a message.
NAMED_FIELD = re.compile(
    r"^(?P<field>[a-z_][a-z0-9_]*(?:\[\d+\]|\.[A-Za-z0-9_]+)*): (?P<reason>.+)$", re.DOTALL
)


@dataclass(frozen=True)
class FieldProblem:
    """One reason a document or request was rejected, located by a dotted field path."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class RoundhouseError(Exception):
    """Base of every domain error; `message` is safe to show to a client."""

    partial_usage: tuple[int, int] | None = None
    """For a stream that failed after its first chunk: the prompt and completion tokens it had
    used (estimated where the worker had not counted them), reported with the error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RoundhouseError):
    """The request or document is malformed; nothing was changed."""

    def __init__(self, message: str, problems: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    @classmethod
    def from_problems(cls, problems: list[FieldProblem]) -> InvalidArgument:
        """Build one error that lists every problem, one per line."""
        lines = "\n".join(str(p) for p in problems)
        return cls(lines, problems)

    @property
    def field(self) -> str | None:
        """The request field at fault: the first problem's path, else the `field: reason`
        prefix of the message; None when neither names one."""
        if self.problems:
            return self.problems[0].path or None
        named = NAMED_FIELD.match(self.message)
        return named["field"] if named else None


class InvalidSpec(InvalidArgument):
    """An asset spec failed validation."""


class NotFound(RoundhouseError):
    """The named thing does not exist."""


class AssetNotFound(NotFound):
    """No asset has that id or alias."""


class OperationNotFound(NotFound):
    """No operation has that id."""


class Conflict(RoundhouseError):
    """The stored revision is not the one the caller expected (optimistic concurrency)."""


class AlreadyExists(Conflict):
    """Something with that name already exists (an API key's name, say); nothing was changed."""


class Unauthenticated(RoundhouseError):
    """No API key, or one that is malformed, unknown, revoked or expired."""


class PermissionDenied(RoundhouseError):
    """The API key is valid but may not do this (an admin route with a non-admin key)."""


class ModelNotAllowed(PermissionDenied):
    """The API key may not use the requested model (not in its `models`)."""


class FailedPrecondition(RoundhouseError):
    """The request is well-formed but the system is not in a state to honour it."""


class WrongInterface(FailedPrecondition):
    """The asset does not implement the interface the request needs."""


class AssetDisabled(FailedPrecondition):
    """The asset's desired state is `disabled`."""


class ModelFailed(FailedPrecondition):
    """The model cannot be served: its last load failed (not installed, broken weights, too
    big for every worker) or its engine died. Not worth retrying at once: the next load is
    tried after a cooldown, an install or a new revision; `message` names the reason."""


class ModelNotReady(RoundhouseError):
    """No worker holds the model and it cannot be loaded in time; retry later."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(RoundhouseError):
    """Admission refused the request: concurrency and queue are full."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(RoundhouseError):
    """An API key is over its rate limits (requests or tokens per minute, requests in flight);
    retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExhausted(RoundhouseError):
    """An API key's token or dollar budget for its period is spent (or this request could
    spend more than is left)."""


class LimitsUnavailable(RoundhouseError):
    """The shared limit counters (Postgres) cannot be reached; a limited key is refused rather
    than let through unchecked."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ContextLengthExceeded(InvalidArgument):
    """The prompt does not fit the model's context length."""


class QuotaExceeded(RoundhouseError):
    """A storage or memory quota would be exceeded."""


class UpstreamError(RoundhouseError):
    """A remote runtime (an OpenAI-compatible upstream) failed."""


class Cancelled(RoundhouseError):
    """The operation was cancelled."""


class DeadlineExceeded(RoundhouseError):
    """The request ran past its deadline (the request timeout, a client's shorter one, or the
    idle time allowed between two streamed tokens); whatever it held is released."""


class DatabaseUnavailable(RoundhouseError):
    """Postgres does not answer now (restarting, unreachable, connection lost); nothing was
    changed that the caller cannot retry."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(RoundhouseError):
    """The service is draining before it stops: work in flight finishes, new work is refused;
    retry after `retry_after_s` (on another replica)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def status_of(exc: BaseException | None) -> str:
    """How a request ended, as the usage ledger and the metrics write it: `ok`, `cancelled`
    (the caller went away), the domain error's name in snake case (`RateLimited` →
    `rate_limited`), else `internal`."""
    if exc is None:
        return "ok"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    if isinstance(exc, RoundhouseError):
        return _CAMEL.sub("_", type(exc).__name__).lower()
    return "internal"
