"""HTTP server of the local provider's endpoint, run as its own process.

Start it with ``python -m imgbench.local_server --model MODEL.pkl``. It binds to
127.0.0.1 on a free port (or ``--port``), prints one line
``listening on http://127.0.0.1:PORT`` to stdout once it accepts requests, and exits
when its parent process exits, so a killed benchmark run leaves no server
behind.

HTTP API:

* ``GET /health`` returns 200 with the class names.
* ``POST /predict`` with the raw image bytes returns
  ``{"label": str, "confidence": float, "scores": {label: probability}}``,
  or 400 with ``{"error": message}`` for a body that is not a decodable image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import queue
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from imgbench.images import ImageDecodeError
from imgbench.local_head import LinearHead, LocalMode

logger = logging.getLogger(__name__)

# Largest request body the server accepts, in bytes.
MAX_BODY_BYTES = 32 * 1024 * 1024


class MicroBatcher:
    """Run concurrent requests' forward passes together, in one batch.

    Request threads decode and resize their own image (Pillow releases the
    GIL), then queue the preprocessed arrays, one per backbone of the mode.
    One inference thread takes every queued request, up to ``max_batch``, and
    runs a single forward pass per backbone and view, so ten concurrent
    requests cost one batched pass instead of ten passes competing for the
    same cores. A lone request is served at once, because the thread takes
    whatever is queued and never waits for a batch to fill.
    """

    def __init__(self, head: LinearHead, mode: LocalMode, max_batch: int = 16):
        self.head = head
        self.mode = mode
        self.max_batch = max_batch
        self.pending: queue.Queue = queue.Queue()
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def predict(self, data: bytes) -> np.ndarray:
        """Return the class probabilities of one encoded image."""
        pixels = self.mode.preprocess_batch([data], ["request body"])
        done = threading.Event()
        slot: dict[str, Any] = {}
        self.pending.put((pixels, done, slot))
        done.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["probabilities"]

    def _run(self) -> None:
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                per_backbone = [np.concatenate([item[0][index] for item in batch])
                                 for index in range(len(self.mode.backbones))]
                probabilities = self.head.predict_proba(self.mode.embed_pixels(per_backbone))
            except Exception as exc:  # handed to every waiting request, which responds with a 500
                logger.exception("forward pass failed for a batch of %d requests", len(batch))
                for _, done, slot in batch:
                    slot["error"] = exc
                    done.set()
                continue
            self.batches += 1
            self.images += len(batch)
            for row, (_, done, slot) in zip(probabilities, batch, strict=True):
                slot["probabilities"] = row
                done.set()


def make_handler(batcher: MicroBatcher, classes: list[str]) -> type[BaseHTTPRequestHandler]:
    """Build the request handler class around the inference batcher."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            logger.debug("local endpoint: " + format, *args)

        def _send_json(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send_json(HTTPStatus.OK, {"status": "ok", "classes": classes,
                                                "batches": batcher.batches, "images": batcher.images})
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/predict":
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length <= 0 or length > MAX_BODY_BYTES:
                self.close_connection = True
                self._send_json(HTTPStatus.BAD_REQUEST, {
                    "error": f"invalid Content-Length {self.headers.get('Content-Length')!r}; "
                             f"send 1 to {MAX_BODY_BYTES} bytes of image data"})
                return
            data = self.rfile.read(length)
            try:
                probabilities = batcher.predict(data)
            except ImageDecodeError as exc:
                self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            except Exception as exc:  # returned as a 500 and logged with its traceback
                logger.exception("local endpoint failed on a request")
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
                return
            best = int(np.argmax(probabilities))
            self._send_json(HTTPStatus.OK, {
                "label": classes[best],
                "confidence": float(probabilities[best]),
                "scores": {name: float(p) for name, p in zip(classes, probabilities, strict=True)},
            })

    return Handler


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a local imgbench model over HTTP on 127.0.0.1.")
    parser.add_argument("--model", required=True, help="pickle written by the local provider's deploy step")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most concurrent requests run in one forward pass (default: 16)")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"invalid --max-batch {args.max_batch}; use 1 or more")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    with open(args.model, "rb") as handle:
        payload = pickle.load(handle)  # written by this project's own deploy step
    mode: LocalMode = payload["mode"]
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    mode.load()

    batcher = MicroBatcher(payload["head"], mode, max_batch=args.max_batch)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(batcher, payload["classes"]))
    server.daemon_threads = True
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
