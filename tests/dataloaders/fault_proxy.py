"""An HTTP proxy in front of the S3 server that breaks a fixed fraction of requests.

Every ``period``-th request gets the next fault of a rotation: a 503 error, a connection reset before any
response, a stall (no answer for ``stall_s``, then a close) and a truncated body (full Content-Length,
half the bytes). Counting rather than random draws makes every kind occur, whatever the order in which
the loader's threads and processes send their requests.

``injected`` counts a fault once it has been served: written out, or the connection reset or closed. A
truncation drawn for a response with no body to cut (a HEAD, an empty object) is not served there; it
waits for the next unfaulted response that has one. A fault whose client hung up first is not counted.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("error", "reset", "stall", "truncate")


class FaultProxy:
    def __init__(self, upstream: str, period: int = 3, stall_s: float = 3.0, faults: tuple[str, ...] = FAULTS):
        self.upstream = urlparse(upstream)
        self.period = period
        self.stall_s = stall_s
        self.injected: Counter = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._rotation = itertools.cycle(faults)  # the faults drawn, in turn
        self._pending_truncations = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.period:
                return None
            return next(self._rotation)

    def _truncate(self, fault: str | None, has_body: bool) -> bool:
        """Whether to cut this response: a truncation drawn for a response without a body to cut moves
        to the next unfaulted response that has one."""
        with self._lock:
            if fault == "truncate" and not has_body:
                self._pending_truncations += 1
                return False
            if fault is None and has_body and self._pending_truncations:
                self._pending_truncations -= 1
                return True
            return fault == "truncate"

    def _served(self, fault: str) -> None:
        with self._lock:
            self.injected[fault] += 1

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        fault = self._next_fault()
        if fault == "stall":  # the client meets it at once (no answer comes), whenever the sleep ends
            self._served(fault)
            self._fail(req, fault)
            return
        try:
            if fault in ("error", "reset"):
                self._fail(req, fault)
            else:
                fault = "truncate" if self._forward(req, body, fault) else None
        except OSError:  # the client hung up first: the fault never reached it
            req.close_connection = True
            return
        if fault is not None:
            self._served(fault)

    def _fail(self, req: BaseHTTPRequestHandler, fault: str) -> None:
        if fault == "error":
            payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            req.send_response(503)
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            req.wfile.write(payload)
            req.wfile.flush()
        elif fault == "reset":
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.close_connection = True
            req.connection.close()
        else:  # stall
            time.sleep(self.stall_s)
            req.close_connection = True

    def _forward(self, req: BaseHTTPRequestHandler, body: bytes, fault: str | None) -> bool:
        """Relay the request upstream and its response back, cut in half when a truncation is due;
        returns whether it was cut."""
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request(req.command, req.path, body=body or None, headers=dict(req.headers))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        req.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                req.send_header(key, value)
        # A HEAD answer has no body but states the object's length, as upstream said it.
        length = resp.getheader("Content-Length", "0") if req.command == "HEAD" else str(len(data))
        req.send_header("Content-Length", length)
        req.end_headers()
        if self._truncate(fault, req.command == "GET" and len(data) > 1):
            req.wfile.write(data[: len(data) // 2])
            req.close_connection = True
            req.wfile.flush()
            req.connection.shutdown(socket.SHUT_RDWR)
            return True
        if req.command != "HEAD":
            req.wfile.write(data)
        return False
