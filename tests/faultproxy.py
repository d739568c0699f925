"""A real HTTP proxy that fails a seeded fraction of the requests it forwards to one upstream (an S3 server).

Plain Python (http.server, http.client), one thread per client connection. Each request gets one of:

- "ok": forwarded, and the upstream's answer returned unchanged;
- "500" / "503": answered by the proxy with an S3-style error, never forwarded (the server stays untouched);
- "drop": the connection closed before forwarding (the client sees no response);
- "lost": forwarded (the server applied it) but the response is lost: the connection closes instead;
- "cut": forwarded, then the response's headers and only half of its body are sent before the connection closes.

"lost" and "cut" are the nasty ones: the client cannot tell whether its write happened, and a download stops
mid-body. Request bodies pass through byte for byte (SigV4 signatures, aws-chunked uploads), Host included.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "drop", "lost", "cut")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    """Listens on 127.0.0.1 and forwards to upstream_url, failing `fraction` of requests (seeded)."""

    def __init__(self, upstream_url: str, fraction: float, seed: int, faults: tuple[str, ...] = FAULTS) -> None:
        host, port = upstream_url.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fraction, self.faults = fraction, faults
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # what each request got, by fault name ("ok" included)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def pick(self) -> str:
        """The fate of the next request (one seeded stream: the same seed gives the same sequence of fates)."""
        with self.lock:
            fate = self.rng.choice(self.faults) if self.rng.random() < self.fraction else "ok"
            self.counts[fate] += 1
            return fate


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects; answers Expect: 100-continue itself

        def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures anyway
            pass

        def do_any(self) -> None:
            body = self._read_body()  # always read in full, so a keep-alive connection stays in step
            fate = proxy.pick()
            if fate in _ERRORS:
                return self._send_error(*_ERRORS[fate])
            if fate == "drop":
                return self._hang_up()
            status, reason, headers, payload = self._forward(body)
            if fate == "lost":
                return self._hang_up()
            if fate == "cut" and len(payload) >= 2:
                self._send(status, reason, headers, payload, len(payload))
                self.wfile.write(payload[: len(payload) // 2])
                return self._hang_up()
            self._send(status, reason, headers, payload, len(payload))
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_any

        def _read_body(self) -> bytes:
            """The raw request body: Content-Length bytes, or the chunked framing as sent (not decoded)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)  # the chunk and its CRLF
                while True:  # trailers (aws-chunked checksums), up to the empty line
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                # The client's own Host header goes through: it is part of the SigV4 signature.
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                payload = resp.read()  # http.client undoes chunked transfer encoding
                keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"transfer-encoding"}]
                return resp.status, resp.reason, keep, payload
            finally:
                conn.close()

        def _send(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes, size: int) -> None:
            self.send_response_only(status, reason)
            for name, value in headers:
                # A HEAD answer keeps the upstream's Content-Length (the object's size, with no body).
                if name.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(size))
            self.end_headers()

        def _send_error(self, status: int, code: str, message: str) -> None:
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
            )
            body = xml.encode()
            self._send(status, code, [("Content-Type", "application/xml")], body, len(body))
            if self.command != "HEAD":
                self.wfile.write(body)

        def _hang_up(self) -> None:
            self.wfile.flush()
            self.close_connection = True

    return Handler
