"""Domain errors, and the one place where they become gRPC status codes."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger("memory3.rpc")


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ServiceError):
    """Stored data is corrupt or missing (e.g. a memory blob failing validation in the bank)."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Domain errors keep their message; anything else is INTERNAL with a generic one (no leak)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal server error"


def rpc_errors(method):
    """Wrap a servicer method (unary or server-streaming) so domain errors abort with their status."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - mapped, logged
                await _abort(context, exc, method.__name__)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, logged
            await _abort(context, exc, method.__name__)
    return unary


async def _abort(context, exc: BaseException, name: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
    await context.abort(code, message)


def error_from_rpc(exc: grpc.aio.AioRpcError) -> ServiceError:
    """A client's view of a failed call: the domain error for its status code, with the server's message."""
    for cls in ServiceError.__subclasses__():
        if exc.code() == cls.code:
            return cls(exc.details())
    error = ServiceError(f"{exc.code().name}: {exc.details()}")
    error.code = exc.code()
    return error
