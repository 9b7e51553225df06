"""Domain errors as HTTP statuses, for the decoder's HTTP doors (KServe v2 REST, OpenAI-style routes).

The gRPC mapping lives in services/rpc/errors.py; this is its HTTP twin, built on the same
`status_for`, so a domain error keeps its message and anything else is a 500 that leaks nothing.
"""

from __future__ import annotations

import grpc

from ..rpc.errors import status_for

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an exception raised while serving a request."""
    code, message = status_for(exc)
    return HTTP_STATUS.get(code, 500), message
