"""Domain errors shared by every service. Domain code raises these; each gRPC servicer maps them to
status codes in exactly one place (``pagedserve.core.grpc_util.abort_for``). Nothing here imports
grpc."""

from __future__ import annotations


class PagedServeError(Exception):
    """Base class. ``code`` names the gRPC status the edge reports."""

    code = "INTERNAL"


class InvalidArgument(PagedServeError):
    """A request field is out of range. ``field`` names it, e.g. ``params.top_p``."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class ResourceExhausted(PagedServeError):
    """Overload: the queue is full, or a request can never fit in the KV pool."""

    code = "RESOURCE_EXHAUSTED"


class RateLimited(ResourceExhausted):
    """A caller went over its rate limit. ``retry_after_s``: when a retry can succeed; the edge
    sends it as ``retry-after`` (gRPC trailing metadata, HTTP header)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(PagedServeError):
    """No valid credentials (API key) came with the call."""

    code = "UNAUTHENTICATED"


class Unavailable(PagedServeError):
    """No healthy worker (or scheduler) can take the request right now."""

    code = "UNAVAILABLE"


class FailedPrecondition(PagedServeError):
    """The call was made for a state the service is no longer in (a worker restarted since the
    scheduler planned the step)."""

    code = "FAILED_PRECONDITION"


class NotFound(PagedServeError):
    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    """A request named a model this router does not serve. ``field`` is ``model``, as for
    ``InvalidArgument``, so every edge can say which field was wrong."""

    field = "model"

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"model: {requested!r} is not served here; this router serves "
                         f"{served!r}")
        self.requested = requested
        self.served = served
