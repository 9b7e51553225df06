"""`memory3 serve text` handles SIGTERM/SIGINT from the moment it listens, as the memory service and the
decoder do: while its release loads, a signal stops it without a traceback."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memory3.services.storage.local_s3 import free_port

# A text service whose release takes 3 s to load, on the port given.
SERVICE = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[2])
from test_engine import TrigramEmbedder, resources
from memory3.services.rpc.server import ServerOptions
from memory3.services.text.engine import TextEngine
from memory3.services.text.server import run_text_server

def load():
    time.sleep(3)
    return resources()

asyncio.run(run_text_server(TextEngine(load, TrigramEmbedder), ServerOptions(port=int(sys.argv[1]))))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_release_loads_stops_the_service(signum):
    """The handlers were installed once the release was loaded: a SIGTERM before then killed the process where it
    was, a SIGINT left a KeyboardInterrupt traceback in the log."""
    port = free_port()
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(port), str(Path(__file__).parent)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and service.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        service.send_signal(signum)
        out, err = service.communicate(timeout=60)
    finally:
        service.kill()
        service.communicate()
    assert service.returncode == 0, err
    assert "Traceback" not in err and "serving release" not in out
