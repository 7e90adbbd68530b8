"""An HTTP proxy on 127.0.0.1 in front of the moto S3 server that answers every Nth request with
503 SlowDown (the answer S3 gives under load) instead of passing it on; during an outage it answers every
request with 403 AccessDenied (revoked credentials) or 503 SlowDown (a storm). Writes under a read-only prefix
are always denied, as a bucket policy granting only reads would."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyS3Proxy:
    def __init__(self, upstream: str, fail_every: int = 0):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.fail_every = fail_every
        self.outage: int | None = None  # 403 or 503: every request gets it until set back to None ...
        self.outage_match: str | None = None  # ... or every request whose path holds this text
        self.read_only: str | None = None  # a path prefix ("/bucket/key") where PUT, POST and DELETE get 403
        self.requests = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FlakyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _failure(self, method: str, path: str) -> int | None:
        with self._lock:
            self.requests += 1
            out = self.outage if self.outage_match is None or self.outage_match in path else None
            if self.read_only and path.startswith(self.read_only) and method in ("PUT", "POST", "DELETE"):
                out = 403
            status = out or (503 if self.fail_every and self.requests % self.fail_every == 0 else None)
            self.failures += status is not None
            return status

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                status = proxy._failure(self.command, self.path)
                if status is not None:
                    answer = ACCESS_DENIED if status == 403 else SLOW_DOWN
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(answer)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    payload = reply.read()
                    self.send_response(reply.status, reply.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's, with no body
                    for key, value in reply.getheaders():
                        if key.lower() not in HOP_HEADERS and (head or key.lower() != "content-length"):
                            self.send_header(key, value)
                    if not head:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
