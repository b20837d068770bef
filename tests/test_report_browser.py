"""Open the generated report in headless Chromium and check that it renders offline.

Needs Debian's ``chromium`` package at /usr/bin/chromium (``apt-get install -y
chromium``) and the ``websocket-client`` Python package. The test fails,
rather than skips, when either is missing, so CI cannot pass without running
it. It drives the page through the Chrome DevTools protocol: it loads
report.html from disk, then checks that no console error, uncaught exception
or non-local request happened and that every image decoded.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from imgbench.report import generate_report

RESULTS = Path(__file__).resolve().parent / "data" / "results"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0")
# Seconds to wait for Chromium to start, and for one protocol reply or page load.
START_TIMEOUT_S = 60
REPLY_TIMEOUT_S = 60
LOCAL_SCHEMES = ("file:", "data:", "about:")
IMAGES_LOADED = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


class DevToolsPage:
    """A minimal Chrome DevTools protocol client for one page target; keeps every event it receives."""

    def __init__(self, websocket_url: str):
        import websocket

        self.connection = websocket.create_connection(websocket_url, timeout=REPLY_TIMEOUT_S, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        request_id = next(self.ids)
        self.connection.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.connection.recv())
            if message.get("id") == request_id:
                assert "error" not in message, f"{method} failed: {message['error']}"
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        for event in self.events:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            message = json.loads(self.connection.recv())
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise AssertionError(f"no {method} event within {REPLY_TIMEOUT_S} s")

    def close(self) -> None:
        self.connection.close()


def start_chromium(profile: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start headless Chromium with a new profile; return the process and its DevTools port."""
    profile.mkdir()
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=log, stderr=subprocess.STDOUT)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Chromium exited with status {process.returncode}:\n{log_path.read_text()}")
        if port_file.exists() and port_file.read_text().strip():
            return process, int(port_file.read_text().splitlines()[0])
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"Chromium wrote no {port_file} within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def page_websocket_url(port: int) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        pages = [target for target in targets if target.get("type") == "page"]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise AssertionError(f"Chromium on port {port} opened no page within {START_TIMEOUT_S} s")


def page_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and log errors among the protocol events."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(arg.get("value", arg.get("description")))
                                                 for arg in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url', '')})")
    return errors


def remote_requests(events: list[dict]) -> list[str]:
    urls = [event["params"]["request"]["url"] for event in events if event.get("method") == "Network.requestWillBeSent"]
    return [url for url in urls if not url.startswith(LOCAL_SCHEMES)]


def test_report_renders_in_chromium(tmp_path):
    assert CHROMIUM.exists(), (f"{CHROMIUM} is missing: install Debian's chromium package "
                               f"(apt-get update && apt-get install -y chromium) to run the browser test")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.fail("the browser test needs the websocket-client package: pip install websocket-client")

    written = generate_report([RESULTS / name for name in ("run-a.json", "emulator.json", "replayed.json")],
                              tmp_path / "report", published=True)
    process, port = start_chromium(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        page = DevToolsPage(page_websocket_url(port))
        try:
            for domain in ("Runtime", "Log", "Page", "Network"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=written.html_path.as_uri())
            page.wait_for("Page.loadEventFired")
            loaded = page.call("Runtime.evaluate", expression=IMAGES_LOADED, returnByValue=True)
            count = page.call("Runtime.evaluate", expression="document.images.length", returnByValue=True)
            title = page.call("Runtime.evaluate", expression="document.title", returnByValue=True)
        finally:
            page.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)

    assert title["result"]["value"] == "imgbench report"
    assert count["result"]["value"] >= 8
    assert loaded["result"]["value"] is True, "an <img> of the report did not load (naturalWidth 0)"
    assert page_errors(page.events) == []
    assert remote_requests(page.events) == []
