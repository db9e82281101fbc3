"""Real sockets: each simulated Windows computer is one threaded HTTP(S) listener on 127.0.0.1.

`StandIn.endpoint(computer)` starts (once) a listener on an ephemeral port that answers WSMan
for that computer with Basic authentication. An endpoint can be put `down` (every request's
connection is closed without an answer, as when a node reboots), and the stand-in can be served
over TLS with a caller-provided certificate.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import socket
import ssl
import threading
from typing import Any

from tests.standin import dispatch, wsman


class Endpoint:
    """One listening computer."""

    def __init__(self, standin: StandIn, computer: str) -> None:
        self.computer = computer
        self.service = wsman.WSManService(standin.dispatcher, computer)
        self.down = False
        self.standin = standin
        handler = _make_handler(self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        if standin.tls is not None:
            self.httpd.socket = standin.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class StandIn:
    """The set of simulated Windows endpoints sharing one dispatcher and one credential."""

    def __init__(
        self,
        dispatcher: dispatch.Dispatcher,
        *,
        username: str = "CORP\\svc-nodepatch",
        password: str = "s3cret-pass",  # noqa: S107 - the stand-in's own test credential
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.username = username
        self.password = password
        self.tls = tls
        self.endpoints: dict[str, Endpoint] = {}
        self.auth_failures = 0
        self._lock = threading.Lock()

    def endpoint(self, computer: str) -> Endpoint:
        with self._lock:
            key = computer.lower()
            if key not in self.endpoints:
                self.endpoints[key] = Endpoint(self, computer)
            return self.endpoints[key]

    def set_down(self, computer: str, down: bool) -> None:
        self.endpoint(computer).down = down

    def authorized(self, header: str | None) -> bool:
        expected = f"{self.username}:{self.password}".encode()
        ok = header == "Basic " + base64.b64encode(expected).decode()
        if not ok:
            self.auth_failures += 1
        return ok

    def stop(self) -> None:
        for endpoint in list(self.endpoints.values()):
            endpoint.stop()


def _make_handler(endpoint: Endpoint) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            verdict = self._verdict(body)
            if verdict is None and body:
                try:
                    status, answer = endpoint.service.handle(body)
                except dispatch.DropConnection:
                    verdict = "drop"
                except dispatch.Unauthorized:
                    verdict = "401"
            if verdict == "drop":
                self._drop()
            elif verdict == "401":
                self._reply(401, b"", {"WWW-Authenticate": 'Basic realm="WSMAN"'})
            elif not body:
                self._reply(200, b"", {})
            else:
                self._reply(status, answer, {"Content-Type": "application/soap+xml;charset=UTF-8"})

        def _verdict(self, body: bytes) -> str | None:
            """'drop', '401' or None (answer normally)."""
            if endpoint.down:
                return "drop"
            if not endpoint.standin.authorized(self.headers.get("Authorization")):
                return "401"
            hook = endpoint.standin.dispatcher.before_request
            return hook(endpoint.computer, body) if hook is not None else None

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, val in headers.items():
                self.send_header(key, val)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
