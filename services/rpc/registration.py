"""Registering a servicer from its proto descriptor, with request decoding that cannot crash.

The generated `add_XServicer_to_server` functions decode requests with `FromString`; a request
that is not a valid message (a string field holding invalid UTF-8, truncated bytes) then fails
inside grpc and the client sees INTERNAL "Exception deserializing request!". Built from the
descriptor instead, a bad request reaches the servicer as a marker and is answered with
INVALID_ARGUMENT and a message that says what is wrong.
"""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from .metrics import RPC_HANDLED


class _Undecodable:
    def __init__(self, message_name: str, reason: str) -> None:
        self.message_name, self.reason = message_name, reason

    def detail(self) -> str:
        return (f"the request is not a valid {self.message_name} ({self.reason}): it is cut short, of another "
                "message type, or holds a string field that is not valid UTF-8")


def _safe_deserializer(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return _Undecodable(cls.DESCRIPTOR.full_name, str(e) or type(e).__name__)
    return deserialize


async def _refuse(context, method: str, request: _Undecodable) -> None:
    """INVALID_ARGUMENT, counted as the servicer's own answers are (`rpc_errors`)."""
    RPC_HANDLED.labels(method=method, code="INVALID_ARGUMENT").inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail())


def _unary(method: str, behavior):
    async def handle(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        return await behavior(request, context)
    return handle


def _streaming(method: str, behavior):
    async def handle(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        async for response in behavior(request, context):
            yield response
    return handle


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register every unary and server-streaming method of `service` implemented by `servicer`."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client-streaming methods are not supported here")
        request_cls, response_cls = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        kwargs = {"request_deserializer": _safe_deserializer(request_cls),
                  "response_serializer": response_cls.SerializeToString}
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_streaming(method.name, behavior), **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(method.name, behavior), **kwargs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
