"""Run the app under gunicorn with a request-buffering thread worker (one engine, log writer and
poller per worker).

gunicorn's ``gthread`` worker hands a connection to a request thread as soon as it is accepted, and
that thread then reads the request line, headers and body with blocking reads: two clients sending
one byte a second hold two threads for as long as they keep sending. :class:`BufferingWorker` reads
every request in full on the worker's event loop first (non-blocking, bounded in size and time) and
only then gives it to a request thread, which therefore never waits on a client. The same front
answers what it refuses (a request line or headers too long, a garbage request line, a body larger
than the limit, conflicting ``Content-Length``/``Transfer-Encoding``, a timeout) with the API's JSON
error shape, as does every error gunicorn itself would render as HTML.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import re
import selectors
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as herr
from gunicorn.workers.gthread import TConn, ThreadWorker

from ..errors import InvalidInput
from ._app import HttpLimits, create_app

__all__ = ["BufferingWorker", "RequestScanner", "prepare_metrics_dir", "run_gunicorn", "error_response"]

log = logging.getLogger("homepage.api")

#: longest time a busy worker leaves new connections to the others (see ``BufferingWorker._busy``)
_ACCEPT_HOLD_S = 0.02

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
            417: "Expectation Failed", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def error_response(status: int, code: str, message: str, field: str | None = None) -> bytes:
    """A complete HTTP/1.1 response with the API's error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


# ---- the request scanner: decides when a buffered request is complete, or what is wrong with it ----
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\xff]+) HTTP/(\d)\.(\d)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")


class Refused(Exception):
    """What the scanner refuses: an HTTP status, an error code and a message naming the part."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass
class RequestScanner:
    """Incremental check of one HTTP/1.1 request in a buffer: ``feed`` returns the number of bytes the
    request occupies once it is complete (None while more is needed) and raises :class:`Refused`.

    Limits: ``max_line`` bytes of request line (414), ``max_fields`` header fields of at most
    ``max_field`` bytes each (431), a body of at most ``max_body`` bytes (413, as soon as
    ``Content-Length`` says so, before any ``100 Continue``).
    """

    max_line: int = 4094
    max_fields: int = 100
    max_field: int = 8190
    max_body: int = 1 << 20
    head_end: int | None = None
    #: the head with ``Expect: 100-continue`` removed (this front answers it), or None when unchanged
    new_head: bytes | None = None
    expect_continue: bool = False
    _length: int | None = None
    _chunked: bool = False
    _pos: int = 0  # chunked: where the next chunk-size line starts
    _body_seen: int = 0
    _trailers: bool = False

    def feed(self, buf: bytes | bytearray) -> int | None:
        if self.head_end is None:
            if not self._head(buf):
                return None
        assert self.head_end is not None
        if self._chunked:
            return self._chunks(buf)
        end = self.head_end + (self._length or 0)
        return end if len(buf) >= end else None

    # -- the head ---------------------------------------------------------------------------------
    def _head(self, buf: bytes | bytearray) -> bool:
        start = 0
        while buf[start:start + 2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            start += 2
        line_end = buf.find(b"\r\n", start)
        if (line_end < 0 and len(buf) - start > self.max_line) or line_end - start > self.max_line:
            raise Refused(414, "uri_too_long", f"request line must be at most {self.max_line} bytes; got "
                          f"{'more' if line_end < 0 else line_end - start}")
        max_head = self.max_line + 2 + self.max_fields * (self.max_field + 2) + 2
        end = buf.find(b"\r\n\r\n", start)
        if end < 0 and b"\r\n" not in buf[start:] and b"\n" in buf[start:]:
            raise Refused(400, "bad_request", "request line must end with CRLF; got a bare LF")
        if end < 0:
            if len(buf) > max_head:
                raise Refused(431, "headers_too_large", f"request headers must be at most {max_head} bytes")
            return False
        lines = bytes(buf[start:end]).split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            shown = lines[0][:80].decode("latin-1")
            raise Refused(400, "bad_request", f"request line must be 'METHOD target HTTP/1.x'; got {shown!r}")
        if m.group(3) != b"1":
            raise Refused(400, "bad_request", f"HTTP version must be 1.0 or 1.1; got {m.group(3).decode()}."
                          f"{m.group(4).decode()}")
        fields = lines[1:]
        if len(fields) > self.max_fields:
            raise Refused(431, "headers_too_large",
                          f"a request may have at most {self.max_fields} header fields; got {len(fields)}")
        lengths: set[bytes] = set()
        te: list[bytes] = []
        expect_at: int | None = None
        for k, f in enumerate(fields):
            if len(f) > self.max_field:
                raise Refused(431, "headers_too_large", f"each header field must be at most {self.max_field} "
                              f"bytes; got {len(f)}")
            name, colon, value = f.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise Refused(400, "bad_request", f"header field must be 'Name: value'; got "
                              f"{f[:80].decode('latin-1')!r}", field="headers")
            if b"\x00" in value or b"\r" in value or b"\n" in value:
                raise Refused(400, "bad_request", f"header {name.decode()} must not contain NUL, CR or LF",
                              field=name.decode())
            low, v = name.lower(), value.strip(b" \t")
            if low == b"content-length":
                lengths.update(p.strip(b" \t") for p in v.split(b","))
            elif low == b"transfer-encoding":
                te += [p.strip(b" \t").lower() for p in v.split(b",")]
            elif low == b"expect":
                if v.lower() != b"100-continue":
                    raise Refused(417, "expectation_failed", f"Expect must be 100-continue; got "
                                  f"{v[:80].decode('latin-1')!r}", field="Expect")
                expect_at = k + 1
        if lengths and te:
            raise Refused(400, "bad_request", "a request must not have both Content-Length and "
                          "Transfer-Encoding", field="Transfer-Encoding")
        if te:
            if te != [b"chunked"]:
                raise Refused(400, "bad_request", "Transfer-Encoding must be 'chunked'; got "
                              f"{b', '.join(te).decode('latin-1')!r}", field="Transfer-Encoding")
            self._chunked = True
        if lengths:
            if len(lengths) > 1 or not all(x.isdigit() for x in lengths):
                raise Refused(400, "bad_request", "Content-Length must be one decimal number; got "
                              f"{b', '.join(sorted(lengths)).decode('latin-1')[:80]!r}", field="Content-Length")
            n = int(next(iter(lengths)))
            if n > self.max_body:
                raise Refused(413, "body_too_large", f"body must be at most {self.max_body} bytes; "
                              f"Content-Length says {n}", field="body")
            self._length = n
        self.head_end = end + 4
        self._pos = self.head_end
        if expect_at is not None:
            self.expect_continue = True
            kept = [lines[0]] + [f for k, f in enumerate(fields, start=1) if k != expect_at]
            self.new_head = bytes(buf[:start]) + b"\r\n".join(kept) + b"\r\n\r\n"
        return True

    # -- a chunked body ---------------------------------------------------------------------------
    def _chunks(self, buf: bytes | bytearray) -> int | None:
        while True:
            eol = buf.find(b"\r\n", self._pos)
            if eol < 0:
                if len(buf) - self._pos > self.max_field:
                    raise Refused(400, "bad_request", "chunk-size line too long", field="body")
                return None
            line = bytes(buf[self._pos:eol])
            if self._trailers:  # after the last chunk: trailer fields until an empty line
                self._pos = eol + 2
                if not line:
                    return self._pos
                continue
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise Refused(400, "bad_request", f"chunk size must be hexadecimal; got {line[:40]!r}",
                              field="body")
            size = int(m.group(1), 16)
            if self._body_seen + size > self.max_body:
                raise Refused(413, "body_too_large", f"body must be at most {self.max_body} bytes; "
                              f"got more (chunked)", field="body")
            if size == 0:
                self._trailers = True
                self._pos = eol + 2
                continue
            data_end = eol + 2 + size
            if len(buf) < data_end + 2:
                return None
            if buf[data_end:data_end + 2] != b"\r\n":
                raise Refused(400, "bad_request", "chunk data must end with CRLF", field="body")
            self._body_seen += size
            self._pos = data_end + 2


# ---- the worker ----------------------------------------------------------------------------------
class _Buffered:
    """A client socket whose first bytes were already read by the event loop: ``recv`` returns the
    ``fence`` bytes of the complete request first, and nothing beyond them (a pipelined next request
    stays in ``prefix`` for the event loop to read in full too). Everything else is the socket's own."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.prefix = bytearray()
        self.fence = 0

    def recv(self, n: int, *flags: int) -> bytes:
        if self.fence > 0:
            out = bytes(self.prefix[:min(n, self.fence)])
            del self.prefix[:len(out)]
            self.fence -= len(out)
            return out
        return self._sock.recv(n, *flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@dataclass
class _Reading:
    conn: TConn
    scanner: RequestScanner
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    draining: bool = False  # answered with an error: read and drop until the client closes


class BufferingWorker(ThreadWorker):  # type: ignore[misc]
    """``gthread`` with requests read in full by the event loop before a request thread sees them.

    Limits come from :class:`~policy_api.serving.HttpLimits` (environment): headers must arrive within
    ``header_timeout_s`` of the connection's first byte being awaited, the body within
    ``body_timeout_s`` after that (408 otherwise); the body may be at most ``max_body_bytes``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = HttpLimits.from_env()
        self._reading: dict[int, _Reading] = {}
        self._in_flight = 0  # requests handed to the request threads, not yet finished
        self._fresh: dict[int, float] = {}  # connections accepted whose first request is still being read
        self._held_since: float | None = None  # accepting withheld (busy) since

    # Workers share one listening socket, and a kept-alive connection stays with the worker that
    # accepted it: left alone, one worker can take every connection of a small client pool while the
    # other idles. So a worker whose request threads are all taken (or promised to connections it
    # accepted within the last ``_ACCEPT_HOLD_S``: a slow client does not count for longer) leaves new
    # connections to a worker with a free thread, for at most ``_ACCEPT_HOLD_S``: then it accepts one
    # anyway, so no connection waits long when every worker is busy.
    def _busy(self) -> bool:
        if self._in_flight >= self.cfg.threads:
            return True
        recent = time.monotonic() - _ACCEPT_HOLD_S
        return self._in_flight + sum(1 for t in self._fresh.values() if t > recent) >= self.cfg.threads

    def set_accept_enabled(self, enabled: bool) -> None:
        if self._busy():
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            enabled = enabled and now - self._held_since >= _ACCEPT_HOLD_S
        else:
            self._held_since = None
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._held_since is not None and not self._accepting:  # wake when the hold ends
            timeout = max(0.0, min(timeout, self._held_since + _ACCEPT_HOLD_S - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def enqueue_req(self, conn: TConn) -> None:
        self._in_flight += 1
        super().enqueue_req(conn)
        if self._busy():
            self.set_accept_enabled(False)

    # connections, new or kept alive, are read here first
    def accept(self, listener: socket.socket) -> None:
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, _Buffered(client), addr, listener.getsockname())
        self._fresh[client.fileno()] = time.monotonic()
        if self._busy():  # a hold starts now, even if this connection was taken after one
            self._held_since = time.monotonic()
            self.set_accept_enabled(False)
        self._start_reading(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)

    def finish_request(self, conn: TConn, fs: Any) -> None:
        self._in_flight -= 1
        super().finish_request(conn, fs)
        sock = conn.sock
        if isinstance(sock, _Buffered) and sock.prefix and conn in self.keepalived_conns:  # pipelined
            self.poller.unregister(sock)
            self.keepalived_conns.remove(conn)
            self._start_reading(conn)
        self.set_accept_enabled(self.alive and self.nr_conns < self.worker_connections)

    def _start_reading(self, conn: TConn) -> None:
        sock = conn.sock
        assert isinstance(sock, _Buffered)
        sock.setblocking(False)
        cfg = self.cfg
        st = _Reading(conn, RequestScanner(cfg.limit_request_line, cfg.limit_request_fields,
                                           cfg.limit_request_field_size, self.limits.max_body_bytes),
                      time.monotonic() + self.limits.header_timeout_s)
        st.buf += sock.prefix
        sock.prefix.clear()
        sock.fence = 0
        self._reading[sock.fileno()] = st
        self.poller.register(sock, selectors.EVENT_READ, lambda _s: self._on_readable(st))
        if st.buf:
            self._scan(st)

    def _on_readable(self, st: _Reading) -> None:
        try:
            data = st.conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(st)
            return
        if st.draining:
            st.buf.clear()
            return
        st.buf += data
        self._scan(st)

    def _scan(self, st: _Reading) -> None:
        sc = st.scanner
        had_head = sc.head_end is not None
        try:
            end = sc.feed(st.buf)
        except Refused as e:
            self._refuse(st, e.status, e.code, e.message, e.field)
            return
        if end is None:
            if not had_head and sc.head_end is not None:
                st.deadline = time.monotonic() + self.limits.body_timeout_s
                if sc.expect_continue:
                    self._send(st, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        sock = st.conn.sock
        assert isinstance(sock, _Buffered)
        self.poller.unregister(sock)
        self._reading.pop(sock.fileno(), None)
        self._fresh.pop(sock.fileno(), None)
        if sc.new_head is not None:
            assert sc.head_end is not None
            st.buf[:sc.head_end] = sc.new_head
            end += len(sc.new_head) - sc.head_end
        sock.prefix += st.buf
        sock.fence = end
        sock.setblocking(True)
        st.conn.data_ready = True
        self.enqueue_req(st.conn)

    def _send(self, st: _Reading, data: bytes) -> None:
        try:
            st.conn.sock.send(data)  # a few hundred bytes into an empty socket buffer
        except OSError:
            pass

    def _refuse(self, st: _Reading, status: int, code: str, message: str, field: str | None = None) -> None:
        self.log.warning("refused a request from %s: %s %s", st.conn.client, status, message)
        self._send(st, error_response(status, code, message, field))
        try:
            st.conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # keep reading (and dropping) a little, so the client sees the answer rather than a reset
        st.draining, st.deadline = True, time.monotonic() + 2.0
        self._fresh.pop(st.conn.sock.fileno(), None)
        st.buf.clear()

    def _drop(self, st: _Reading) -> None:
        sock = st.conn.sock
        self._reading.pop(sock.fileno(), None)
        self._fresh.pop(sock.fileno(), None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        st.conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for st in [s for s in self._reading.values() if s.deadline <= now]:
            if st.draining or not st.buf:  # idle, or already answered
                self._drop(st)
            else:
                part = "headers" if st.scanner.head_end is None else "body"
                limit = self.limits.header_timeout_s if part == "headers" else self.limits.body_timeout_s
                self._refuse(st, 408, "request_timeout", f"the request's {part} must arrive within {limit:g} s")

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """What gunicorn's own parser refuses, or an error outside the app, in the API's JSON shape."""
        status, code = 400, "bad_request"
        if isinstance(exc, herr.LimitRequestLine):
            status, code = 414, "uri_too_long"
        elif isinstance(exc, herr.LimitRequestHeaders):
            status, code = 431, "headers_too_large"
        elif isinstance(exc, herr.ExpectationFailed):
            status, code = 417, "expectation_failed"
        elif isinstance(exc, herr.InvalidResponseHeader | herr.InvalidResponseHeaderName) or not isinstance(
                exc, herr.ParseException):
            status, code = 500, "internal"
        if status == 500:
            self.log.exception("error outside the app")
            message = f"internal error: {type(exc).__name__}"
        else:
            self.log.warning("invalid request from %s: %s", addr, exc)
            message = f"{type(exc).__name__}: {exc}"
        try:
            client.setblocking(False)
            client.send(error_response(status, code, message))
        except OSError:
            pass


# ---- the application --------------------------------------------------------------------------
def _worker_exit(server: Any, worker: Any) -> None:
    # flush this worker's log queue; what cannot be written goes to the spill file
    app = getattr(worker, "wsgi", None)
    rt = getattr(app, "extensions", {}).get("homepage") if app is not None else None
    if rt is not None:
        rt.close()


def _post_worker_init(worker: Any) -> None:
    # the worker's app is loaded (imports, engine state, model): those ~200,000 objects live as long as
    # the worker and hold no garbage cycles worth looking for, yet every full collection scanned them
    # all, 90-190 ms during which the worker's requests waited (a few times a minute while the loop
    # publishes). Frozen, they are left out of every collection; what is allocated later is not.
    gc.freeze()


def _child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], factory: Callable[[], Flask] = create_app) -> None:
        self.options = options
        self.factory = factory
        super().__init__()

    def load_config(self) -> None:
        for k, v in self.options.items():
            self.cfg.set(k, v)

    def load(self) -> Flask:
        return self.factory()  # in the worker, after the fork: its engine and threads are its own


def prepare_metrics_dir() -> Path:
    """A fresh ``$HOMEPAGE_DATA_DIR/prometheus`` for this server's processes (workers and the loop),
    set as ``PROMETHEUS_MULTIPROC_DIR`` so that ``/metrics`` aggregates them all."""
    prom = Path(os.environ.get("HOMEPAGE_DATA_DIR", "homepage-data")) / "prometheus"
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(prom):
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    return prom


def run_gunicorn(host: str, port: int, workers: int, threads: int = 1) -> int:
    """Serve until stopped (see :func:`prepare_metrics_dir` for the metrics)."""
    try:
        HttpLimits.from_env()  # a bad HOMEPAGE_* limit is one clear error here, not a worker that fails to boot
    except ValueError as e:
        raise InvalidInput(str(e), field=str(e).split(" ", 1)[0]) from None
    prepare_metrics_dir()
    _App({
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": BufferingWorker,
        "threads": threads,
        # a connection waiting for its request holds no thread, only memory (at most the body limit)
        "worker_connections": 256,
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": None,
        "worker_exit": _worker_exit,
        "post_worker_init": _post_worker_init,
        "child_exit": _child_exit,
        "loglevel": "warning",
    }).run()
    return 0
