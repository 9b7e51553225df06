"""Bad input for every RPC of the GenerationService, TextService and MemoryService.

Requests are made from the proto descriptors, so every field of every request message is
covered: fields left out, strings of any length and script, invalid UTF-8 (written as raw bytes,
which no protobuf library would produce), edge-case numbers (NaN, infinities, extremes, negative),
unknown enum values, and plain garbage bytes. Each call has a deadline; the answer must be one of
the documented status codes, every service must stay up, and the decoder's slots must drain.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

from memory3.v1 import generation_service_pb2, memory_service_pb2, text_service_pb2

SERVICES = {
    "decoder": generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"],
    "text": text_service_pb2.DESCRIPTOR.services_by_name["TextService"],
    "memory": memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"],
}
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
              "DATA_LOSS"}
INT_EDGES = (0, 1, -1, 2, 7, 64, 255, 319, 320, 1023, 1024, 1025, 2**31 - 1, -(2**31))
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-6, 1e30, 3e38, math.nan, math.inf, -math.inf)
TEXT_PIECES = ("", " ", "a", "Pemberlyn", "\x00", "é", "日本語", "🙂", "\u202e", "\n\r\t", "x" * 300)


def methods() -> list[tuple[str, str, Descriptor, bool]]:
    """(service key, '/package.Service/Method', request descriptor, server-streaming) for every RPC."""
    return [(key, f"/{service.full_name}/{m.name}", m.input_type, m.server_streaming)
            for key, service in SERVICES.items() for m in service.methods]


# ---- protobuf wire encoding, enough to write any value (including invalid UTF-8) in any field ----
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def encode_field(field: FieldDescriptor, value) -> bytes:
    """One occurrence of `field` with `value` (bytes for strings and messages), on the wire."""
    t = field.type
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
        return _key(field.number, 2) + _varint(len(value)) + value
    if t == FieldDescriptor.TYPE_FLOAT:
        return _key(field.number, 5) + struct.pack("<f", value)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _key(field.number, 1) + struct.pack("<d", value)
    if t == FieldDescriptor.TYPE_BOOL:
        return _key(field.number, 0) + _varint(int(bool(value)))
    return _key(field.number, 0) + _varint(int(value))  # ints and enums


# ---- random values from the descriptor -------------------------------------------------------------
class RandomRequests:
    """Random encoded requests for a message descriptor, reproducible from a seed."""

    def __init__(self, seed: int, *, known_ids: list[str] = (), max_repeated: int = 4) -> None:
        self.rng = random.Random(seed)
        self.known_ids, self.max_repeated = list(known_ids), max_repeated

    def text(self) -> bytes:
        r = self.rng
        roll = r.random()
        if roll < 0.1:
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 12)))  # likely invalid UTF-8
        if roll < 0.2 and self.known_ids:
            return r.choice(self.known_ids).encode()
        if roll < 0.25:
            return ("y" * r.choice((4096, 70_000))).encode()
        return "".join(r.choice(TEXT_PIECES) for _ in range(r.randrange(0, 6))).encode()

    def value(self, field: FieldDescriptor, depth: int):
        r, t = self.rng, field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.text()
        if t == FieldDescriptor.TYPE_BYTES:
            return bytes(r.randrange(256) for _ in range(r.choice((0, 1, 8, 64, 300))))
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return r.choice(FLOAT_EDGES) if r.random() < 0.6 else r.uniform(-2, 2)
        if t == FieldDescriptor.TYPE_BOOL:
            return r.random() < 0.5
        if t == FieldDescriptor.TYPE_ENUM:
            return r.choice([v.number for v in field.enum_type.values] + [7, -1])
        return r.choice(INT_EDGES) if r.random() < 0.7 else r.randrange(-1000, 5000)

    def message(self, descriptor: Descriptor, depth: int = 0) -> bytes:
        out = bytearray()
        for field in descriptor.fields:
            if depth > 3 or self.rng.random() < 0.35:
                continue  # missing
            repeated = field.is_repeated
            for _ in range(self.rng.randrange(0, self.max_repeated + 1) if repeated else 1):
                out += encode_field(field, self.value(field, depth))
        return bytes(out)

    def request(self, descriptor: Descriptor) -> bytes:
        if self.rng.random() < 0.1:  # garbage
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 40)))
        return self.message(descriptor)


# ---- calling -----------------------------------------------------------------------------------
def call_raw(channel: grpc.Channel, method: str, payload: bytes, *, streaming: bool, response_cls,
             timeout_s: float) -> tuple[str, str]:
    """Send already-encoded bytes; (status code name, details). A stream is read to its end."""
    kwargs = {"request_serializer": lambda b: b, "response_deserializer": response_cls.FromString}
    try:
        if streaming:
            for _ in channel.unary_stream(method, **kwargs)(payload, timeout=timeout_s):
                pass
        else:
            channel.unary_unary(method, **kwargs)(payload, timeout=timeout_s)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def response_class(service_key: str, method: str):
    name = method.rsplit("/", 1)[1]
    return GetMessageClass(SERVICES[service_key].methods_by_name[name].output_type)


def fuzz_addresses(addresses: dict[str, str], *, count: int, seed: int = 0, known_ids: list[str] = (),
                   timeout_s: float = 5.0, alive: Callable[[], list[str]] = lambda: []) -> dict:
    """`count` random requests spread over every RPC; returns codes, undocumented answers and slow calls."""
    gen = RandomRequests(seed, known_ids=known_ids)
    rpcs = methods()
    codes: Counter = Counter()
    undocumented: list[str] = []
    slow = 0
    channels = {key: grpc.insecure_channel(address) for key, address in addresses.items()}
    try:
        for i in range(count):
            key, method, descriptor, streaming = rpcs[i % len(rpcs)]
            payload = gen.request(descriptor)
            started = time.monotonic()
            code, details = call_raw(channels[key], method, payload, streaming=streaming,
                                     response_cls=response_class(key, method), timeout_s=timeout_s)
            if time.monotonic() - started > timeout_s + 2.0:
                slow += 1
            codes[code] += 1
            if code not in DOCUMENTED and len(undocumented) < 10:
                undocumented.append(f"{method} {payload[:80]!r}: {code} {details[:200]}")
    finally:
        for channel in channels.values():
            channel.close()
    return {"tried": count, "by_code": dict(sorted(codes.items())), "undocumented": undocumented,
            "hung": slow, "crashed": alive()}


def fuzz_services(rs, *, count: int, seed: int = 0) -> dict:
    """Fuzz a ReliabilityStack's text, memory and (fail-policy) decoder services."""
    result = fuzz_addresses({k: rs.address(k) for k in SERVICES}, count=count, seed=seed,
                            known_ids=rs.reference_ids()[:4], alive=rs.crashed)
    zero = rs.gauges_return_to_zero()
    result["gauges_return_to_zero"] = zero
    result["survived"] = not result["undocumented"] and not result["hung"] and not result["crashed"] and zero
    return result
