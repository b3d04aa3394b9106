"""A static file server on 127.0.0.1 that stands in for the web while the demo world is downloaded."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("demo server: " + format, *args)


@contextlib.contextmanager
def serve_directory(root: Path, port: int) -> Iterator[str]:
    """Serve `root` at http://127.0.0.1:<port> for the duration of the block; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise OSError(
            f"studies.<study>.source.port: cannot serve the demo world on 127.0.0.1:{port} ({err}); "
            "stop what uses the port or choose another port in params.yaml"
        ) from err
    thread = threading.Thread(target=server.serve_forever, name="demo-world-server", daemon=True)
    thread.start()
    log.info("serving %s at http://127.0.0.1:%d", root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        log.info("stopped the demo world server")
