"""Hypothesis over every RPC of the GenerationService, TextService and MemoryService, through the
running processes: request messages built from the proto descriptors with every field either
missing or drawn from strings (including invalid UTF-8 and long ones), bytes, extreme numbers
(NaN, infinities, subnormals) and unknown enum values, or plain garbage. Each call has a deadline.
Only documented status codes come back, every process stays up, and the decoder's slots drain.
"""

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory3.bench.fuzz import DOCUMENTED, call_raw, encode_field, methods, response_class

pytestmark = pytest.mark.integration
TIMEOUT_S = 5.0
INT_RANGES = {FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
              FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1)}


def strings(known: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text(max_size=80).map(lambda s: s.encode("utf-8", "surrogatepass")),  # lone surrogates: invalid UTF-8
        st.binary(min_size=1, max_size=16),
        st.sampled_from(known).map(str.encode),
        st.sampled_from([4096, 70_000]).map(lambda n: b"z" * n),
    )


def values(field: FieldDescriptor, known: list[str], depth: int) -> st.SearchStrategy:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return strings(known)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if t == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, known, depth + 1)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 9)
    low, high = INT_RANGES[t]
    return st.one_of(st.integers(-2, 1100), st.integers(low, high))


def occurrences(field: FieldDescriptor, known: list[str], depth: int) -> st.SearchStrategy[bytes]:
    value = values(field, known, depth)
    many = st.lists(value, max_size=4) if field.is_repeated else value.map(lambda v: [v])
    present = many.map(lambda vs: b"".join(encode_field(field, v) for v in vs))
    return st.one_of(st.just(b""), present)  # b"": the field is missing


def messages(descriptor, known: list[str], depth: int = 0) -> st.SearchStrategy[bytes]:
    if depth > 2:
        return st.just(b"")
    return st.tuples(*(occurrences(f, known, depth) for f in descriptor.fields)).map(b"".join)


@pytest.fixture(scope="module")
def channels(reliability_stack):
    opened = {key: grpc.insecure_channel(reliability_stack.address(key)) for key in ("decoder", "text", "memory")}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def known_ids(reliability_stack):
    return reliability_stack.reference_ids()[:3]


@pytest.mark.parametrize(("service", "method", "descriptor", "streaming"), methods(),
                         ids=[m[1].rsplit(".", 1)[1] for m in methods()])
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_request_gets_a_documented_answer(reliability_stack, channels, known_ids, service, method, descriptor,
                                              streaming, data):
    payload = data.draw(st.one_of(messages(descriptor, known_ids), st.binary(max_size=64)), label="payload")
    code, details = call_raw(channels[service], method, payload, streaming=streaming,
                             response_cls=response_class(service, method), timeout_s=TIMEOUT_S)
    assert code in DOCUMENTED, f"{method} answered {code}: {details}"
    assert not reliability_stack.crashed()


def test_slots_drain_after_the_fuzzing(reliability_stack):
    assert reliability_stack.gauges_return_to_zero()
    assert reliability_stack.gauges_return_to_zero("decoder-continue")
    assert not reliability_stack.crashed()
