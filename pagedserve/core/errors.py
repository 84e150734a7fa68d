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


class SequenceRefused(InvalidArgument):
    """What one sequence of a step carries is out of range (a worker's step checks): the step
    is refused and ``seq_id`` says whose request is at fault."""

    def __init__(self, field: str, message: str, seq_id: int) -> None:
        super().__init__(field, message)
        self.seq_id = seq_id


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


class Aborted(PagedServeError):
    """A request stopped on the server's side (``Scheduler.Abort``), not by its own client:
    ABORTED, so a client can tell it from success and from its own cancel (CANCELLED)."""

    code = "ABORTED"


class StepRefused(PagedServeError):
    """A worker that is up refused a step as malformed (checked before it changed anything):
    the worker is fine. ``seq_id``: the sequence at fault, when the worker said."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, seq_id: int | None = None) -> None:
        super().__init__(message)
        self.seq_id = seq_id


class RequestFailed(PagedServeError):
    """One request failed where the others beside it did not; it is not retried elsewhere."""

    code = "INTERNAL"


class WorkerFault(Unavailable):
    """A worker that was reached failed a step (an internal or device error) or did not answer
    it in time: out of service like one that is gone, but a request in that step may be the
    cause, so it counts against the step's requests (``scheduler/engine.py``)."""


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
