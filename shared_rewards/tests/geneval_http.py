"""A test HTTP server on a background thread, shared by the GenEval server and client tests."""
from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def serving(server):
    """Runs `server.serve_forever` on a daemon thread for the `with` block, then shuts it down."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
