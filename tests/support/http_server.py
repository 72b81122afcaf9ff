"""A local HTTP file server for download tests: 127.0.0.1 only, Range support, scripted failures.

    with serve_files({"/data/UCF101/UCF101.rar": rar_bytes}) as server:
        server.url                    # "http://127.0.0.1:<port>"
        server.cut_after["/x"] = 100  # first GET of /x sends 100 bytes, then drops the connection
        server.requests               # [{"path", "range", "status"}, ...] for assertions
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


@dataclass
class LocalServer:
    files: dict[str, bytes]
    url: str = ""
    supports_range: bool = True
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping, once
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, path: str) -> list[dict]:
        with self.lock:
            return [request for request in self.requests if request["path"] == path]


def _handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _log(self, status: int) -> None:
            with server.lock:
                server.requests.append({"path": self.path, "range": self.headers.get("Range"), "status": status})

        def do_GET(self) -> None:
            body = server.files.get(self.path)
            if body is None:
                self._log(404)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            status = 200
            range_header = self.headers.get("Range")
            if range_header and server.supports_range:
                match = re.fullmatch(r"bytes=(\d+)-", range_header)
                start = int(match.group(1)) if match else 0
                if start >= len(body):
                    self._log(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            payload = body[start:]
            self._log(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Content-Type", "application/octet-stream")
            if server.supports_range:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            with server.lock:
                cut = server.cut_after.pop(self.path, None)
            if cut is not None:
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def serve_files(files: dict[str, bytes], supports_range: bool = True) -> Iterator[LocalServer]:
    """Serve `files` (URL path -> bytes) on a free port of 127.0.0.1 for the duration of the block."""
    state = LocalServer(files=dict(files), supports_range=supports_range)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
