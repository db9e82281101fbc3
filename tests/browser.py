"""Headless Chromium for tests, over the DevTools protocol: load a local page, collect console
errors, uncaught exceptions, failed loads and network requests, read the timeline's nodes, take
a screenshot. Chromium is Debian's `chromium` (.ci/install-chromium); without it a test skips
and says why, unless NODEPATCH_REQUIRE_BROWSER=1 (CI), where it fails instead."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REQUIRE = "NODEPATCH_REQUIRE_BROWSER"
TIMEOUT_S = 60
TIMELINE_NODES = (
    "Array.from(document.querySelectorAll('#timeline [data-node]'))"
    ".map(g => g.getAttribute('data-node'))"
)


def require() -> str:
    """The chromium executable, or skip (fail under NODEPATCH_REQUIRE_BROWSER=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = (
        "chromium is not installed: run `sudo bash .ci/install-chromium` "
        "(Debian's chromium package) to run the report's browser test"
    )
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Seen:
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    timeline_nodes: list[str] = field(default_factory=list)


class _Session:
    """One DevTools websocket: commands by id, events collected on the way."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=TIMEOUT_S, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def wait_for(self, method: str) -> None:
        stop = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > stop:
                raise AssertionError(f"chromium sent no {method}")
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within `seconds`."""
        import websocket

        self.ws.settimeout(seconds)
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            return  # quiet for `seconds`: everything the load caused has arrived
        finally:
            self.ws.settimeout(TIMEOUT_S)

    def close(self) -> None:
        self.ws.close()


def load(chromium: str, page: Path, screenshot: Path, width: int = 1280) -> Seen:
    """Open `page` in a fresh headless Chromium and report what it saw."""
    # Chromium's helper processes can still write to the profile for a moment after the
    # browser exits: the whole process group is ended, and a leftover file is no failure.
    with tempfile.TemporaryDirectory(
        prefix="nodepatch-chromium-", ignore_cleanup_errors=True
    ) as profile:
        proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, with its helpers
        )
        try:
            return _inspect(_page_socket(Path(profile)), page, screenshot, width)
        finally:
            _end_group(proc)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End Chromium and every helper process of its group (SIGTERM, then SIGKILL)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser


def _page_socket(profile: Path) -> str:
    """The DevTools websocket of the first page target, once Chromium has written its port."""
    import urllib.request

    port_file = profile / "DevToolsActivePort"
    stop = time.monotonic() + TIMEOUT_S
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > stop:
            raise AssertionError("chromium did not open its DevTools port")
        time.sleep(0.05)
    port = port_file.read_text().split()[0]
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        if time.monotonic() > stop:
            raise AssertionError("chromium opened no page")
        time.sleep(0.05)


def _inspect(url: str, page: Path, screenshot: Path, width: int) -> Seen:
    session = _Session(url)
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            session.call(f"{domain}.enable")
        session.call("Page.navigate", url=page.resolve().as_uri())
        session.wait_for("Page.loadEventFired")
        session.drain(0.5)
        nodes = session.call("Runtime.evaluate", expression=TIMELINE_NODES, returnByValue=True)
        size = session.call(
            "Runtime.evaluate",
            expression="document.documentElement.scrollHeight",
            returnByValue=True,
        )
        height = min(int(size["result"]["value"]), 4000)
        session.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = session.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        seen = _seen(session.events)
        seen.timeline_nodes = list(nodes["result"].get("value") or [])
        return seen
    finally:
        session.close()


def _seen(events: list[dict[str, Any]]) -> Seen:
    seen = Seen()
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            seen.errors.append(
                "console: "
                + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            seen.errors.append(f"exception: {text}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            seen.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            request_url = params["request"]["url"]
            if not request_url.startswith(("file:", "data:", "about:")):
                seen.requests.append(request_url)
    return seen
