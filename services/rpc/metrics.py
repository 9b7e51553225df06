"""Every Prometheus metric the services export, in vLLM's vocabulary under a `memory3_` prefix.

Defined once here so dashboards, alerts and the chart's autoscaler read one list of names.
Counters are exported with a `_total` suffix (e.g. `memory3_generation_tokens_total`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
# Up to 20 s: a stage that usually takes milliseconds but can stall past a client's 10 s deadline.
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 20.0)

# ---- decoder (GenerationService) ----
TIME_TO_FIRST_TOKEN = Histogram("memory3_time_to_first_token_seconds", "Time from request arrival to its first token.",
                                buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("memory3_inter_token_latency_seconds", "Time between consecutive tokens of a stream.",
                                buckets=_LATENCY_BUCKETS)
E2E_REQUEST_LATENCY = Histogram("memory3_e2e_request_latency_seconds", "Time from request arrival to its end.",
                                buckets=_LATENCY_BUCKETS)
REQUEST_QUEUE_TIME = Histogram("memory3_request_queue_time_seconds",
                               "Time from a request's arrival to its batch slot: tokenizing, its prompt's "
                               "memories and the wait for a row.", buckets=_LATENCY_BUCKETS)
NUM_REQUESTS_RUNNING = Gauge("memory3_num_requests_running", "Streams holding a batch slot.")
NUM_REQUESTS_WAITING = Gauge("memory3_num_requests_waiting", "Streams queued for a batch slot.")
GENERATION_TOKENS = Counter("memory3_generation_tokens", "Tokens generated.")
PROMPT_TOKENS = Counter("memory3_prompt_tokens", "Prompt tokens prefilled.")
SCHEDULER_CPU = Counter("memory3_scheduler_cpu_seconds",
                        "CPU time of the decoder's scheduler thread (model passes and batching); the rest of "
                        "process_cpu_seconds_total is gRPC, streaming and retrieval I/O.")
MEMORY_WAIT = Histogram("memory3_memory_wait_seconds",
                        "Per memory swap while decoding: how long the stream paused at the chunk boundary for "
                        "its memories (0 when they had arrived).", buckets=(0.0, *_FAST_BUCKETS))
REQUEST_SUCCESS = Counter("memory3_request_success",
                          "Finished requests by finish reason: stop, length, or abort (its client left).",
                          ["finished_reason"])
RPC_HANDLED = Counter("memory3_rpc_handled", "RPCs answered, by method and gRPC status code (every service).",
                      ["method", "code"])
REQUEST_FAILURE = Counter("memory3_request_failure",
                          "Requests ended by an error, by gRPC status code (refusals at capacity included; "
                          "requests a front end refused before the engine saw them are not).", ["code"])

# ---- retrieval (text service, and the decoder's calls to it) ----
RETRIEVAL_LATENCY = Histogram("memory3_retrieval_latency_seconds",
                              "Time from a retrieval request's arrival to its answer, queue time included.",
                              buckets=_FAST_BUCKETS)
RETRIEVAL_QUEUE_TIME = Histogram("memory3_retrieval_queue_time_seconds",
                                 "Time a retrieval request waited for a worker.", buckets=_FAST_BUCKETS)
RETRIEVAL_QUERIES = Counter("memory3_retrieval_queries", "Retrieval queries answered.")
RETRIEVAL_REQUESTS_WAITING = Gauge("memory3_retrieval_requests_waiting",
                                   "Retrieval requests queued for a worker (the text service's autoscaling signal).")
RETRIEVAL_BATCHES_RUNNING = Gauge("memory3_retrieval_batches_running", "Retrieval batches in worker threads.")

# ---- memory fetch (memory service, and the decoder's calls to it) ----
MEMORY_FETCHES = Counter("memory3_memory_fetches", "Memories requested from a tier.", ["tier"])
MEMORY_HITS = Counter("memory3_memory_hits", "Memories found in a tier.", ["tier"])
MEMORY_MISSES = Counter("memory3_memory_misses", "Memories not found in a tier.", ["tier"])
MEMORY_FETCH_LATENCY = Histogram("memory3_memory_fetch_latency_seconds", "Latency of one batched fetch from a tier.",
                                 ["tier"], buckets=_FAST_BUCKETS)
MEMORY_CORRUPT = Counter("memory3_memory_corrupt", "Blobs that failed validation (never used).", ["tier"])
MEMORY_TIER_ERRORS = Counter("memory3_memory_tier_errors", "Failed calls to a tier (unreachable, timeout).", ["tier"])


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics over HTTP in a daemon thread; returns the bound port (port 0 picks one).
    `host` as gRPC takes it: an IPv6 address in brackets ("[::]"), which the HTTP server takes bare."""
    server, _thread = start_http_server(port, addr=host.removeprefix("[").removesuffix("]"))
    return server.server_port
