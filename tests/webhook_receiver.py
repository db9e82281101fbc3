"""A real HTTP receiver on 127.0.0.1 for webhook tests: it answers each POST as told (accept,
500, or too late for the sender's timeout) and records every request it received."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OK, ERROR, SLOW = "ok", "500", "slow"
SLOW_S = 1.5


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answer: str

    @property
    def doc(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers with the queued answers in order, then with `default`."""

    default: str = OK
    answers: deque[str] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Received]:
        """Requests answered 200 in time (what the sender saw succeed, or may have)."""
        with self.lock:
            return [r for r in self.received if r.answer == OK]

    def answer(self, headers: dict[str, str], body: bytes) -> str:
        with self.lock:
            answer = self.answers.popleft() if self.answers else self.default
            self.received.append(Received(headers, body, answer))
        return answer


def serve(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer = receiver.answer(dict(self.headers.items()), body)
            if answer == SLOW:
                time.sleep(SLOW_S)
            self.send_response(500 if answer == ERROR else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> int:
    """A port nothing listens on: a receiver that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
