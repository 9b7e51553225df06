"""`serve kserve`'s liveness route, over a stand-in model (the route's logic; the engine's health is
tested in test_engine.py, a real predictor in tests/integration/test_kserve.py)."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from memory3.services.decoder.kserve_model import LIVE_PATH, add_liveness_route


def test_the_liveness_route_follows_the_engine():
    """KServe's /v2/health/live answers 200 while the process runs: a predictor whose GPU failed was
    never restarted. /memory3/live answers 503, saying why, once the engine cannot serve again."""
    class Model:
        reason = None

        def dead(self):
            return self.reason

    model, app = Model(), FastAPI()
    add_liveness_route(app, model)
    client = TestClient(app)
    assert client.get(LIVE_PATH).status_code == 200
    model.reason = "the device failed (RuntimeError: CUDA error: an illegal memory access)"
    reply = client.get(LIVE_PATH)
    assert reply.status_code == 503 and reply.json() == {"live": False, "reason": model.reason}
