"""A fault-injecting TCP proxy in front of a real S3 endpoint (moto_server), for the storage fault tests.

Clients (dvc, boto3) talk to the proxy's loopback port; it forwards bytes to the real endpoint unless
a fault is switched on:
- `stop_after_puts(n)`: forward until the n-th `PUT` request has been sent on, then stop like a
  crashed endpoint (every open connection reset, new ones refused);
- `error_500(n, methods)`: answer the next n requests (of `methods`, default any) with an S3
  `500 InternalError`, then forward again;
- `hang(methods)`: read requests (of `methods`, default any) and never answer them, until `heal()`.
`heal()` returns to plain forwarding. The proxy counts what it refused or answered itself.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

_ERROR_500 = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
              b"Connection: close\r\n\r\n%s")
_S3_ERROR = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>"
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self._lock = threading.Lock()
        self._mode, self._budget = "pass", 0  # "pass" | "stop_after_puts" | "stopped" | "error_500" | "hang"
        self._methods: tuple[bytes, ...] | None = None  # the requests error_500 and hang apply to; None: all
        self._conns: list[socket.socket] = []
        self.puts_forwarded = self.answered_500 = self.refused = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ switches

    def stop_after_puts(self, n: int) -> None:
        with self._lock:
            self._mode, self._budget = "stop_after_puts", n

    def error_500(self, n: int, methods: tuple[str, ...] | None = None) -> None:
        with self._lock:
            self._mode, self._budget, self._methods = "error_500", n, _encode(methods)

    def hang(self, methods: tuple[str, ...] | None = None) -> None:
        with self._lock:
            self._mode, self._methods = "hang", _encode(methods)

    def heal(self) -> None:
        with self._lock:
            self._mode = "pass"

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self._drop_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                c.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
                if mode == "stopped":
                    self.refused += 1
            if mode == "stopped":
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.append(client)
        upstream = None
        try:
            while True:
                head, body = _read_request(client)
                if head is None:
                    return
                with self._lock:
                    mode = self._mode
                    if mode in ("error_500", "hang") and self._methods is not None and \
                            head.split(b" ", 1)[0] not in self._methods:
                        mode = "pass"  # a fault for other methods: this request goes through
                    if mode == "error_500":
                        self._budget -= 1
                        self.answered_500 += 1
                        if self._budget <= 0:
                            self._mode = "pass"
                if mode == "error_500":
                    client.sendall(_ERROR_500 % (len(_S3_ERROR), _S3_ERROR))
                    return
                if mode in ("hang", "stopped"):
                    while self._mode == "hang" and not self._closed:
                        threading.Event().wait(0.05)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                upstream.sendall(head + body)
                if head.startswith(b"PUT "):
                    with self._lock:
                        self.puts_forwarded += 1
                        if self._mode == "stop_after_puts":
                            self._budget -= 1
                            if self._budget <= 0:
                                self._mode = "stopped"
                    if self._mode == "stopped":
                        self._drop_all()
                        return
                response = _read_response(upstream, head.startswith(b"HEAD "))
                if response is None:
                    return
                client.sendall(response)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass


def _encode(methods: tuple[str, ...] | None) -> tuple[bytes, ...] | None:
    return None if methods is None else tuple(m.encode() for m in methods)


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return -1
        buf += chunk
    return buf.index(marker) + len(marker)


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bool:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True


def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.strip().lower()] = value.strip()
    return out


def _read_request(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """One HTTP/1.1 request (head, body) with a Content-Length body (what boto3 sends); (None, b"") at EOF."""
    buf = bytearray()
    end = _read_until(sock, buf, b"\r\n\r\n")
    if end < 0:
        return None, b""
    head = bytes(buf[:end])
    h = _headers(head)
    length = int(h.get(b"content-length", b"0"))
    if h.get(b"expect", b"").lower() == b"100-continue":  # boto3 waits for it before sending a PUT body:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the proxy answers it and drops the header
        head = b"\r\n".join(line for line in head.split(b"\r\n")
                             if not line.lower().startswith(b"expect:"))
    if not _read_exact(sock, buf, end + length):
        return None, b""
    return head, bytes(buf[end:end + length])


def _read_response(sock: socket.socket, to_head: bool) -> bytes | None:
    """One HTTP/1.1 response with Content-Length (moto's) or chunked encoding, as raw bytes."""
    buf = bytearray()
    end = _read_until(sock, buf, b"\r\n\r\n")
    if end < 0:
        return None
    h = _headers(bytes(buf[:end]))
    status = bytes(buf[:end]).split(b" ", 2)[1]
    if status in (b"204", b"304") or to_head:  # no body, whatever Content-Length says
        return bytes(buf[:end])
    if b"content-length" in h:
        n = end + int(h[b"content-length"])
        return bytes(buf[:n]) if _read_exact(sock, buf, n) else None
    if h.get(b"transfer-encoding", b"").lower() == b"chunked":
        pos = end
        while True:
            line_end = _read_until_from(sock, buf, pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end - 2]).split(b";")[0], 16)
            pos = line_end + size + 2
            if not _read_exact(sock, buf, pos):
                return None
            if size == 0:
                return bytes(buf[:pos])
    return bytes(buf[:end])  # no body


def _read_until_from(sock: socket.socket, buf: bytearray, pos: int) -> int:
    while True:
        i = buf.find(b"\r\n", pos)
        if i >= 0:
            return i + 2
        chunk = sock.recv(65536)
        if not chunk:
            return -1
        buf += chunk
