"""The loopback HTTP server that the emulators share: start, stop and URL."""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

logger = logging.getLogger(__name__)


class LoopbackEmulator:
    """Serve an emulator's request handler on 127.0.0.1 in a background thread.

    A subclass sets ``service_name`` (used in logs), ``handler_base`` and
    ``port`` (0 picks a free port). ``start`` serves a subclass of
    ``handler_base`` whose ``emulator`` attribute is this object.
    """

    service_name: ClassVar[str]
    handler_base: ClassVar[type[BaseHTTPRequestHandler]]
    port: int
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() or use it in a with statement")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        handler = type(f"{type(self).__name__}Handler", (self.handler_base,), {"emulator": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        thread_name = f"{self.service_name.lower().replace(' ', '-')}-emulator"
        self._thread = threading.Thread(target=self._server.serve_forever, name=thread_name, daemon=True)
        self._thread.start()
        logger.info("%s emulator listening on %s", self.service_name, self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
            logger.info("%s emulator stopped", self.service_name)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve_until_interrupted(emulator: LoopbackEmulator) -> None:
    """Run an emulator from the command line: log to stderr, print its URL, serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with emulator:
        print(f"listening on {emulator.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def read_json_object(body: bytes, error: type[Exception]) -> dict:
    """Parse a request body as a JSON object; raise ``error(400, message)`` when it is not one.

    ``error`` is the emulator's own error-response class, so the client gets
    that service's error body.
    """
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise error(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    return value
