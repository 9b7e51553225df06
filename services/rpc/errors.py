"""Domain errors, and the one place where they become gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

from .metrics import RPC_HANDLED

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


# Longest status message sent: gRPC carries it in a header, and a message over the peer's header
# limit (16 KiB by default) would turn the status into RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 2000
SHOWN_CHARS = 80  # of a client's string quoted in a message


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for an error message, cut to `limit` characters: a client's string can be any size."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value)} characters)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Domain errors keep their message (cut to MAX_MESSAGE_CHARS); anything else is INTERNAL with a
    generic one (no leak)."""
    if isinstance(exc, ServiceError):
        message = str(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message)} characters in all)"
        return exc.code, message
    return grpc.StatusCode.INTERNAL, "internal server error"


def rpc_errors(method):
    """Wrap a servicer method (unary or server-streaming) so domain errors abort with their status."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except asyncio.CancelledError:
                _count_cancelled(context, method.__name__)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, logged
                await _abort(context, exc, method.__name__)
            RPC_HANDLED.labels(method=method.__name__, code="OK").inc()
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            reply = await method(self, request, context)
        except asyncio.CancelledError:
            _count_cancelled(context, method.__name__)
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, logged
            await _abort(context, exc, method.__name__)
        RPC_HANDLED.labels(method=method.__name__, code="OK").inc()
        return reply
    return unary


def _count_cancelled(context, name: str) -> None:
    """A call gRPC cancelled: its client's deadline passed (the failure a client sees when a service
    is too slow, which no other count shows) or the client went away."""
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
    code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    RPC_HANDLED.labels(method=name, code=code).inc()


async def _abort(context, exc: BaseException, name: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code() if hasattr(context, "code") else None  # set by the servicer's own abort
        RPC_HANDLED.labels(method=name, code=code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN").inc()
        raise exc
    code, message = status_for(exc)
    RPC_HANDLED.labels(method=name, code=code.name).inc()
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
    await context.abort(code, message)


def with_code(error: ServiceError) -> str:
    """`CODE: message`, once: `error_from_rpc` names the code in the message of a code without a class."""
    text = str(error)
    return text if text.startswith(f"{error.code.name}: ") else f"{error.code.name}: {text}"


def error_from_rpc(exc: grpc.aio.AioRpcError) -> ServiceError:
    """A client's view of a failed call: the domain error for its status code, with the server's message."""
    for cls in ServiceError.__subclasses__():
        if exc.code() == cls.code:
            return cls(exc.details())
    error = ServiceError(f"{exc.code().name}: {exc.details()}")
    error.code = exc.code()
    return error
