"""The decoder as a KServe custom model: Open Inference Protocol v2 over REST and gRPC, text in and out.

KServe's ModelServer runs the HTTP server (v1/v2 REST, health, /metrics, and our OpenAI-style
route) and the v2 gRPC server. This model opens the release in `load()` (before the servers
listen, as KServe expects) and starts the engine in `start_engine()`, KServe's hook for models
with an engine, which runs in the servers' own event loop: the scheduler, retrieval and every
request share that loop. Readiness (`/v2/health/ready`, `/v2/models/{name}/ready`, gRPC
ServerReady and ModelReady) turns true once the engine runs and the text and memory services
answered, and with the "fail" retrieval policy follows their health, as `serve decoder` does.
v2 has no streaming (OIP gRPC is unary); stream through `POST /v1/completions`.

v2 request: input `text`, BYTES, shape [1], the UTF-8 prompt; optional request parameters
`max_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop` (a string), `use_memory`,
`include_reference_text`, `presence_penalty`, `frequency_penalty` (over gRPC, floats as strings:
KServe's InferParameter has no double). Logprobs and logit biases are the OpenAI routes' and the
GenerationService's; several choices (`n`), the OpenAI routes'.
Response: `text` (BYTES [1]) and `citations` (BYTES [1], a JSON list of per-chunk references),
or those of them the request's `outputs` names, with `finish_reason`, `prompt_tokens` and
`completion_tokens` parameters. A malformed request is a 400 `{"error": message}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kserve
import numpy as np
from fastapi import Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import GrpcException
from kserve import InferOutput, InferRequest, InferResponse
from kserve.model_server import app as kserve_app
from kserve.protocol.dataplane import DataPlane

from ..rpc.errors import InvalidInput, ServiceError, Unavailable
from .chat import ChatTemplate
from .engine import GenerationEngine
from .http_clients import CLIENT_HOST, WatchClients, client_id
from .http_errors import http_status
from .kserve_drain import DrainFirstModelServer
from .openai_routes import GENERATION_PATHS, add_completion_routes, citation_json, error_response
from .server import BuiltEngine, DecoderSettings, build_engine, open_release, wait_for_dependencies, watch_readiness
from .validation import build_request, finite_float

log = logging.getLogger("memory3.decoder")

INPUT = "text"
OUTPUTS = ("text", "citations")
LIVE_PATH = "/memory3/live"  # liveness of the engine (`add_liveness_route`)
PARAMETERS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float), "seed": (int,),
    "stop": (str,), "use_memory": (bool,), "include_reference_text": (bool,), "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "min_tokens": (int,)}
CUT_UNANSWERED = ("the decoder is shutting down and stopped this request before it finished: retry it on another "
                  "replica")
# Set by KServe itself or by v2 clients (tritonclient): not ours to judge.
PROTOCOL_PARAMETERS = {"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                       "headers"}


class Memory3Model(kserve.Model):
    def __init__(self, name: str, settings: DecoderSettings) -> None:
        super().__init__(name)
        self.settings = settings
        self.engine = True  # KServe's flag: this model has an engine to start (start_engine) in the server's loop
        self._release = None
        self._built: BuiltEngine | None = None
        self._dependencies_up = False  # they answered, and (with the "fail" policy) still do
        self._stopping = False
        self._watch: asyncio.Task | None = None  # held: the event loop keeps only a weak reference to a task
        self._engine_stop: asyncio.Future | None = None

    # ---- lifecycle (called by KServe) ----
    def load(self) -> bool:
        """Open the release (download and verify); idempotent, since KServe calls it again while not healthy.

        `ready` says the release is open: KServe registers only a model that is ready after load().
        Whether it can serve is `healthy()`, which the readiness routes ask.
        """
        if self._stopping:  # KServe loads a model that is not healthy again, which a stopping one is not
            return self.ready
        if self._release is None:
            self._release = open_release(self.settings)
        self.ready = True
        return self.ready

    async def start_engine(self) -> None:
        """Start the engine, then wait for the text and memory services; a SIGTERM meanwhile ends the wait.

        KServe runs this beside its servers and exits once all of them returned, so it must not
        outlive a stop; the dependency watch is a task of its own, cancelled when the loop ends.
        """
        self._built = await build_engine(self.settings, self._release)
        if not await wait_for_dependencies(self._built, stopping=lambda: self._stopping,
                                           policy=self.settings.engine.retrieval_policy):
            log.info("stopped before the text and memory services reported SERVING")
            return
        self._dependencies_up = True
        self._watch = asyncio.create_task(watch_readiness(self.settings, self._built, self._follow_readiness))
        log.info("KServe model %r serving release %r", self.name, self._release.name)

    async def _follow_readiness(self, up: bool) -> None:
        self._dependencies_up = up

    def dead(self) -> str | None:
        """Why the engine can serve nothing until the process restarts, or None (`GenerationEngine.dead`)."""
        return self._built.engine.dead() if self._built is not None else None

    async def healthy(self) -> bool:
        """Ready to serve: the engine runs and its scheduler steps do not keep failing, the dependencies
        answered (and answer, under the "fail" policy), and no stop has begun. Every readiness route
        and probe asks this."""
        engine = self._built.engine if self._built is not None else None
        return (self.ready and self._dependencies_up and engine is not None and engine.started
                and not engine.draining and engine.failing() is None)

    def stop(self) -> None:
        """On SIGTERM, before the servers stop (DrainFirstModelServer): turn not ready, refuse new
        requests, fail the queued ones, and stop the engine once its last request ended. It stops
        in the servers' event loop, while that still runs: a scheduler thread outliving the loop
        would hand a step's tokens to a closed loop. KServe calls it again once its servers stopped.
        """
        self.ready = False
        self._stopping = True
        if self._built is not None and self._engine_stop is None:
            self._engine_stop = asyncio.ensure_future(self._built.engine.stop())

    async def drained(self) -> None:
        """Return once the requests running at `stop` ended (at once if the engine never started)."""
        if self._engine_stop is not None:
            await asyncio.shield(self._engine_stop)

    def close(self) -> None:
        """After the servers stopped: stop the scheduler thread (blocking), if `stop` could not."""
        if self._built is not None and self._built.engine.started:
            self._built.engine.scheduler.stop()
            self._built.engine.started = False

    def current(self) -> GenerationEngine:
        engine = self._built.engine if self._built is not None else None
        if self._stopping:
            raise Unavailable("the decoder is shutting down: retry the request on another replica")
        if engine is None or not engine.started:
            raise Unavailable("the decoder is starting (loading its release); retry shortly")
        return engine

    # ---- v2 metadata ----
    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT, "datatype": "BYTES", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": name, "datatype": "BYTES", "shape": [1]} for name in OUTPUTS]

    # ---- inference ----
    async def predict(self, payload, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        grpc_request = isinstance(payload, InferRequest) and payload.from_grpc
        try:
            return await self._predict(payload, client_id(headers or {}, CLIENT_HOST.get()))
        except ServiceError as exc:
            if grpc_request:  # KServe's gRPC interceptor turns GrpcException into this status
                raise GrpcException(status_code=exc.code, details=str(exc)) from exc
            raise  # REST: rest_error_handler

    async def _predict(self, payload, client: str) -> InferResponse:
        """`client` is who asks, for the per-client stream limit: the `x-client-id` header or
        metadata, else (over REST) the client's host."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"use the v2 protocol: POST /v2/models/{self.name}/infer with a BYTES input "
                               f"{INPUT!r} of shape [1]")
        engine = self.current()
        wanted = _requested_outputs(payload)
        prompt = _prompt(payload)
        params = _parameters(payload.parameters)
        stop = params.pop("stop", None)
        request = await build_request(engine, prompt=prompt, stop=(stop,) if stop is not None else (),
                                      request_id=payload.id or "", client_id=client, **params)
        whole = await engine.complete(request)
        values = {"text": lambda: whole.text,
                  "citations": lambda: json.dumps([citation_json(c) for c in whole.citations])}
        outputs = [InferOutput(name, [1], "BYTES", data=[values[name]()]) for name in wanted]
        parameters: dict[str, Any] = {"finish_reason": whole.finish_reason or "",
                                      "prompt_tokens": whole.usage.prompt_tokens,
                                      "completion_tokens": whole.usage.completion_tokens}
        if whole.warnings:
            parameters["warnings"] = "; ".join(whole.warnings)
        return InferResponse(response_id=request.request_id, model_name=self.name, infer_outputs=outputs,
                             parameters=parameters, use_binary_outputs=payload.use_binary_outputs)


def _requested_outputs(payload: InferRequest) -> list[str]:
    """The outputs to return, in the model's order: those the request names, or all (OIP: a request
    without `outputs` gets every output). Checked before generating, so a typo costs no tokens."""
    names = [o.name for o in payload.request_outputs or []]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; this model's outputs are {list(OUTPUTS)}")
    return [name for name in OUTPUTS if name in names] if names else list(OUTPUTS)


def _prompt(payload: InferRequest) -> str:
    tensors = [i for i in payload.inputs if i.name == INPUT]
    if not tensors:
        names = [i.name for i in payload.inputs]
        raise InvalidInput(f"the request needs an input named {INPUT!r} (BYTES, shape [1]) holding the prompt; "
                           f"got inputs {names}")
    if len(tensors) > 1:
        raise InvalidInput(f"the request has {len(tensors)} inputs named {INPUT!r}; send one prompt per request")
    tensor = tensors[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {INPUT!r} must have datatype BYTES (UTF-8 text), got {tensor.datatype}")
    try:
        values = tensor.as_numpy().reshape(-1)
    except Exception as e:  # noqa: BLE001 - malformed tensor data is the caller's to fix
        raise InvalidInput(f"input {INPUT!r} could not be read as a BYTES tensor of shape {tensor.shape}: {e}") from e
    if values.size != 1:
        raise InvalidInput(f"input {INPUT!r} holds {values.size} elements; send one prompt per request (shape [1])")
    value = values[0]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"input {INPUT!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(value, str):
        raise InvalidInput(f"input {INPUT!r} must hold the prompt as a string, "
                           f"got {type(value).__name__} {value!r:.40}")
    return value


def _parameters(raw) -> dict[str, Any]:
    """Request parameters (a dict over REST, InferParameter messages over gRPC) as build_request arguments.

    KServe's gRPC InferParameter has no double field (Triton's has), so a float sent by a gRPC
    client arrives empty: floats may also be given as strings ("0.7").
    """
    out: dict[str, Any] = {}
    for name, value in (raw or {}).items():
        if name in PROTOCOL_PARAMETERS:
            continue
        if name not in PARAMETERS:
            raise InvalidInput(f"unknown parameter {name!r}; this model takes {sorted(PARAMETERS)}")
        kinds = PARAMETERS[name]
        if hasattr(value, "WhichOneof"):  # gRPC InferParameter
            choice = value.WhichOneof("parameter_choice")
            if choice is None:
                raise InvalidInput(f"parameter {name!r} arrived without a value KServe's v2 gRPC can read (bool, "
                                   "int64 or string): send floats as strings, e.g. \"0.7\"")
            value = getattr(value, choice)
        if float in kinds and isinstance(value, str):
            value = finite_float(f"parameter {name!r}", value)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise InvalidInput(f"parameter {name!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        out[name] = finite_float(f"parameter {name!r}", value) if float in kinds else value
    return out


async def rest_error_handler(_request: Request, exc: ServiceError) -> JSONResponse:
    """Domain errors on the v2 REST routes: KServe's `{"error": message}` with the matching status."""
    status, message = http_status(exc)
    return JSONResponse({"error": message}, status_code=status)


# A parameter's alternative types, as pydantic names them in the location of each alternative's error.
_ALTERNATIVES = {"float": "a number", "int": "an integer", "bool": "a boolean", "str": "a string"}


def validation_message(errors: list[dict]) -> str:
    """FastAPI's validation errors of a v2 request as one sentence that says where and what to fix.

    The body is `Union[InferenceRequest, bytes]` and a parameter a union of scalars: pydantic
    reports each alternative, so the raw-bytes one is dropped and a parameter's are merged.
    """
    for error in errors:
        if error["type"] == "json_invalid":
            return f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
    messages: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    for error in errors:
        source, *loc = [str(part) for part in error["loc"]]
        loc = [part for part in loc if part != "InferenceRequest"]
        if source == "body" and loc == ["bytes"]:
            continue
        kind = _ALTERNATIVES.get(loc[-1]) if loc else None
        if kind:
            loc = loc[:-1]
        where = ".".join(loc if source == "body" else [source, *loc]) or source
        if kind:
            kinds.setdefault(where, []).append(kind)
        else:
            messages.setdefault(where, []).append(error["msg"])
    said = [f"{where}: must be {' or '.join(k)}" for where, k in kinds.items()]
    said += [f"{where}: {'; '.join(m)}" for where, m in messages.items()]
    return "not a valid v2 request: " + "; ".join(said)


async def v2_validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The Open Inference Protocol answers a malformed request with 400 `{"error": message}`;
    FastAPI's default is 422 `{"detail": [...]}`, which other routes keep."""
    if not request.url.path.startswith("/v2/"):
        return await request_validation_exception_handler(request, exc)
    return JSONResponse({"error": validation_message(list(exc.errors()))}, status_code=400)


class ModelsReadyDataPlane(DataPlane):
    """KServe's server readiness (`/v2/health/ready`, gRPC ServerReady) is always true; the OIP
    says a server is ready when its models are, and a readiness probe needs exactly that."""

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models().values())
        for model in models:
            if not await model.healthy():
                return False
        return bool(models)


def add_liveness_route(app, model: Memory3Model) -> None:
    """`GET LIVE_PATH`: 200 while the engine can serve, 503 (and why) once it cannot until the process
    restarts (a device fault, a stuck model pass), for a liveness probe. KServe's `/v2/health/live`
    answers 200 for as long as the process runs, so a predictor whose GPU failed stayed up for good."""

    async def live() -> JSONResponse:
        reason = model.dead()
        if reason is None:
            return JSONResponse({"live": True})
        return JSONResponse({"live": False, "reason": reason}, status_code=503)

    app.add_api_route(LIVE_PATH, live, methods=["GET"])


def generation_path(path: str) -> bool:
    """A route that generates: v2 inference (`/v2/models/NAME[/versions/V]/infer`) or a completion."""
    return path in GENERATION_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def cut_reply(path: str) -> JSONResponse:
    """A generation request the server cut unanswered when its grace period ran out: a 503 in its
    route's error format, saying to retry (an SSE stream already answered says so in the stream)."""
    if path in GENERATION_PATHS:
        return error_response(Unavailable(CUT_UNANSWERED))
    return JSONResponse({"error": CUT_UNANSWERED}, status_code=503)


def serve_kserve(settings: DecoderSettings, *, model_name: str, http_port: int, grpc_port: int,
                 grace_s: float, chat_template: ChatTemplate | None = None) -> int:
    """Run KServe's ModelServer with this model and the OpenAI-style route until SIGTERM/SIGINT,
    which drains the engine before the servers stop (kserve_drain)."""
    model = Memory3Model(model_name, settings)
    model.load()
    add_completion_routes(kserve_app, model.current, model_name, chat_template)
    add_liveness_route(kserve_app, model)
    kserve_app.add_middleware(WatchClients, watched=generation_path, cut_reply=cut_reply)
    kserve_app.add_exception_handler(ServiceError, rest_error_handler)
    kserve_app.add_exception_handler(RequestValidationError, v2_validation_error_handler)
    server = DrainFirstModelServer(model, grace_s=grace_s, http_port=http_port, grpc_port=grpc_port)
    server.dataplane = ModelsReadyDataPlane(server.registered_models)
    print(f"KServe model {model_name!r} (release {settings.release}): HTTP :{http_port} (v2 REST, "
          f"/v1/completions, /v1/chat/completions{'' if chat_template else ' (no chat template)'}), "
          f"v2 gRPC :{grpc_port}", flush=True)
    try:
        server.start([model])
    finally:
        model.close()
    return 0
