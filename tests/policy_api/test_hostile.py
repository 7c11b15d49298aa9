"""A hostile-input corpus against a real `homepage serve` (gunicorn, one worker, SQLite).

Every answer is a JSON 4xx in the API's error shape (never a 5xx, never HTML), the server keeps
serving normal traffic while slow clients hold connections, and it serves normally afterwards.
Front-server cases go over raw sockets (requests would refuse to send them).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time
from typing import Any
from unittest import mock

import pytest
import requests

from policy_api.serving._gunicorn import RequestScanner
from policy_api.serving._routes import _redacted

from .test_api import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"HOMEPAGE_HEADER_TIMEOUT_S": "1.5", "HOMEPAGE_BODY_TIMEOUT_S": "1.5", "HOMEPAGE_TOKEN_FAILURES": "5",
           "HOMEPAGE_TOKEN_WINDOW_S": "3", "HOMEPAGE_MAX_BODY_BYTES": str(256 * 1024)}
    with mock.patch.dict(os.environ, env):
        s = Server(tmp_path_factory.mktemp("hostile"), workers=1)
    yield s
    assert s.stop() == 0
    log = (s.dir / "server.log").read_text()
    for sign in ("unhandled error", "error outside the app", "Error handling request"):  # the API's own
        assert sign not in log, log[-3000:]


def raw(server: Server, data: bytes, *, pause: float = 0.0, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is; the status, headers and body of the answer (the first non-1xx one)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        if pause:
            time.sleep(pause)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep and not head.startswith(b"HTTP/1.1 1"):
                hdrs = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
                n = int(hdrs.get("Content-Length", "-1"))
                if 0 <= n <= len(body):
                    break
            elif sep:  # an interim 1xx answer: keep reading after it
                pass
    return parse(buf)


def parse(buf: bytes) -> tuple[int, dict[str, str], bytes]:
    while buf.startswith(b"HTTP/1.1 1"):  # drop interim answers
        buf = buf.partition(b"\r\n\r\n")[2]
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return status, hdrs, body


def assert_json_error(status: int, hdrs: dict[str, str], body: bytes, expected: int, field: str | None = None,
                      match: str | None = None) -> dict[str, Any]:
    assert status == expected, (status, body[:300])
    assert hdrs.get("content-type", "").startswith("application/json"), hdrs
    err = json.loads(body)["error"]
    assert set(err) == {"code", "message", "field"} and err["message"]
    if field is not None:
        assert err["field"] == field, err
    if match is not None:
        assert match in err["message"], err
    return err


def req(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    h = {"Host": "x", **(headers or {})}
    if body and "Content-Length" not in h and "Transfer-Encoding" not in h:
        h["Content-Length"] = str(len(body))
    return (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode(
        "latin-1") + body


def layout(server: Server, **params: str) -> requests.Response:
    return requests.get(server.url + "/layout", params=params or {"user_id": "u1"}, timeout=10)


# ---- what the front server refuses ------------------------------------------------------------
FRONT = [
    pytest.param(req("GET", "/layout?user_id=" + "a" * 5000), 414, None, id="request-line-too-long"),
    pytest.param(req("GET", "/layout?user_id=a", {f"X-H{k}": "v" for k in range(150)}), 431, None,
                 id="too-many-headers"),
    pytest.param(req("GET", "/layout?user_id=a", {"X-Big": "v" * 10000}), 431, None, id="header-too-large"),
    pytest.param(b"HELLO\r\n\r\n", 400, None, id="garbage-request-line"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, None, id="tls-hello-on-http"),
    pytest.param(b"GET /layout?user_id=a HTTP/2.0\r\nHost: x\r\n\r\n", 400, None, id="http-2.0-text"),
    pytest.param(b"GET /layout?user_id=a HTTP/1.1\nHost: x\n\n", 400, None, id="bare-lf"),
    pytest.param(req("POST", "/feedback", {"Content-Length": "5", "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"),
                 400, "Transfer-Encoding", id="cl-and-te"),
    pytest.param(req("POST", "/feedback", {"Content-Length": "5, 6"}, b"{}"), 400, "Content-Length",
                 id="two-lengths"),
    pytest.param(req("POST", "/feedback", {"Content-Length": "-1"}), 400, "Content-Length", id="negative-length"),
    pytest.param(req("POST", "/feedback", {"Content-Length": "0x10"}), 400, "Content-Length", id="hex-length"),
    pytest.param(req("POST", "/feedback", {"Transfer-Encoding": "gzip, chunked"}), 400, "Transfer-Encoding",
                 id="unsupported-coding"),
    pytest.param(req("POST", "/feedback", {"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n"), 400, "body",
                 id="bad-chunk-size"),
    pytest.param(req("POST", "/feedback", {"Content-Length": str(50 * 2**20), "Expect": "100-continue"}), 413,
                 "body", id="expect-continue-too-large"),
    pytest.param(req("POST", "/feedback", {"Content-Length": str(300 * 1024)}, b"{" * 1000), 413, "body",
                 id="declared-body-too-large"),
    pytest.param(req("POST", "/feedback", {"Transfer-Encoding": "chunked"},
                     b"".join(b"10000\r\n" + b"[" * 0x10000 + b"\r\n" for _ in range(5))), 413, "body",
                 id="chunked-body-too-large"),
    pytest.param(req("GET", "/layout?user_id=a", {"Expect": "something-else"}), 417, "Expect",
                 id="unknown-expectation"),
    pytest.param(b"GET /layout?user_id=a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, None,
                 id="nul-in-header"),
    pytest.param(b"GET /layout?user_id=a HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n", 400, None,
                 id="obsolete-folding"),
    pytest.param(b"GET /layout?user_id=a HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400, None,
                 id="space-in-header-name"),
]


@pytest.mark.parametrize(("data", "status", "field"), FRONT)
def test_front_server_refusals_are_json(server, data, status, field):
    got = raw(server, data)
    assert_json_error(*got, status, field)
    assert got[1].get("connection") == "close"


def test_expect_continue_with_a_small_body_gets_100_then_the_answer(server):
    rid = layout(server).json()["request_id"]
    body = json.dumps({"request_id": rid, "events": [{"event_id": "ec1", "slot": 0, "item_id": "x",
                                                       "type": "impression"}]}).encode()
    head = req("POST", "/feedback", {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                     "Expect": "100-continue"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # asked before the body is sent
        s.sendall(body)
        buf = b""
        while b"}" not in buf.partition(b"\r\n\r\n")[2]:
            buf += s.recv(4096)
    status, _, got = parse(buf)
    # one 100 only (the worker must not send a second), then the route's own answer
    assert b"100 Continue" not in buf
    assert status in (202, 400), got  # 400 when x is not on the page this worker served
    assert json.loads(got)


def read_one(s: socket.socket) -> Any:
    """One whole response's JSON body from a keep-alive connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    n = int(next(line.split(b": ")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < n:
        body += s.recv(65536)
    return json.loads(body[:n])


def test_pipelined_requests_on_one_connection_are_all_answered(server):
    """Requests read ahead by the front stay queued for the connection, in order."""
    one = lambda u: req("GET", f"/layout?user_id={u}")  # noqa: E731
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(one("p1") + one("p2") + req("GET", "/healthz"))
        buf, answers = b"", []
        while len(answers) < 3:
            chunk = s.recv(65536)
            assert chunk, answers
            buf += chunk
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    break
                n = int(next(line.split(b": ")[1] for line in head.split(b"\r\n") if line.lower().startswith(
                    b"content-length")))
                if len(rest) < n:
                    break
                answers.append(json.loads(rest[:n]))
                buf = rest[n:]
    assert [a.get("user_id") for a in answers[:2]] == ["p1", "p2"] and answers[2] == {"status": "ok"}
    # a complete request followed by a part of the next: the part waits on the event loop, not on the
    # worker's only request thread
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(one("p3") + b"GET /layout?user_id=p4 HTTP/1.1\r\nHo")
        assert read_one(s)["user_id"] == "p3"
        t0 = time.perf_counter()
        assert layout(server, user_id="other").status_code == 200
        assert time.perf_counter() - t0 < 1.0
        s.sendall(b"st: x\r\n\r\n")
        assert read_one(s)["user_id"] == "p4"


def test_slow_clients_do_not_block_normal_requests_and_time_out(server):
    """Eight connections sending headers a byte at a time and two with a short body: with one worker
    and one request thread, a normal request still answers at once, and each slow one gets 408."""
    answers: list[bytes] = []

    def slow_headers() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            for b in b"GET /layout?user_id=slow HTTP/1.1\r\nHost: x\r\n":
                if select.select([s], [], [], 0)[0]:  # answered: stop sending
                    break
                s.send(bytes([b]))
                time.sleep(0.1)
            answers.append(s.recv(4096))

    def short_body() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(req("POST", "/feedback", {"Content-Type": "application/json", "Content-Length": "100"}) + b"{")
            answers.append(s.recv(4096))

    threads = [threading.Thread(target=slow_headers) for _ in range(8)] + [
        threading.Thread(target=short_body) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    took = []
    for k in range(5):
        t0 = time.perf_counter()
        assert layout(server, user_id=f"n{k}").status_code == 200
        took.append(time.perf_counter() - t0)
    for t in threads:
        t.join(timeout=15)
    assert max(took) < 1.0, took  # before the fix: blocked for as long as the slow clients kept sending
    assert len(answers) == 10
    for a in answers:
        assert_json_error(*parse(a), 408)


# ---- what the app refuses ----------------------------------------------------------------------
LAYOUT = [
    ({"user_id": "a\x00b"}, "user_id"),
    ({"user_id": "a\x85"}, "user_id"),  # NEL: a control character (the spec's pattern refuses it too)
    ({"user_id": "\u3000 \t"}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "x" * 201}, "user_id"),
    ({"user_id": ["a", "b"]}, "user_id"),
    ({"user_id": "a", "devcie": "tv"}, "devcie"),
    ({"user_id": "a", "device": "fridge"}, "device"),
    ({"user_id": "a", "hour": "24"}, "hour"),
    ({"user_id": "a", "hour": "-1"}, "hour"),
    ({"user_id": "a", "hour": "1e1"}, "hour"),
    ({"user_id": "a", "hour": "\u0661"}, "hour"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ({"user_id": "a", "locale": "en_US"}, "locale"),
    ({"user_id": "a", "surface": "Home Page"}, "surface"),
    ({"user_id": "a", "f_Net": "wifi"}, "f_Net"),  # feature names are lower case: a typo is not a feature
    ({"user_id": "a", "f_net": "wi\x00fi"}, "f_net"),
    ({"user_id": "a", "f_net": "w" * 65}, "f_net"),
    ({"user_id": "a", **{f"f_x{k}": "1" for k in range(17)}}, "f_*"),
]


@pytest.mark.parametrize(("params", "field"), LAYOUT)
def test_layout_hostile_queries(server, params, field):
    r = requests.get(server.url + "/layout", params=params, timeout=10)
    assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, 400, field)


def test_layout_context_is_served_and_logged(server):
    r = layout(server, user_id="ctx", device="tv", locale="pt-BR", surface="home.tab2", hour="7", f_network="wifi",
               f_battery="0.25")
    assert r.status_code == 200
    rid = r.json()["request_id"]
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{server.db_path}")
    deadline = time.time() + 10
    row = None
    while row is None and time.time() < deadline:
        with eng.connect() as c:
            row = c.execute(sa.text("SELECT context FROM decisions WHERE request_id = :r"), {"r": rid}).first()
        time.sleep(0.1)
    eng.dispose()
    assert row is not None
    ctx = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    assert {k: ctx[k] for k in ("device", "locale", "surface", "hour", "features")} == {
        "device": "tv", "locale": "pt-BR", "surface": "home.tab2", "hour": 7,
        "features": {"network": "wifi", "battery": 0.25}}


def post(server: Server, body: bytes | str, ctype: str = "application/json") -> requests.Response:
    return requests.post(server.url + "/feedback", data=body, headers={"Content-Type": ctype}, timeout=10)


def event(**kw: Any) -> dict[str, Any]:
    return {"event_id": f"e{time.perf_counter_ns()}", "slot": 0, "item_id": "x", "type": "play", **kw}


@pytest.fixture()
def page(server):
    d = layout(server, user_id="hostile").json()
    return d["request_id"], d["modules"]


def shown(modules, slot=0):
    return modules[slot]["items"][0]["item_id"]


def test_feedback_hostile_bodies(server, page):
    rid, mods = page
    item = shown(mods)
    now = time.time()
    n_slots = len(mods)
    cases: list[tuple[bytes | str, str | None, str]] = [
        (json.dumps({"request_id": rid, "events": [event(item_id=item, event_id="a\x00b")]}), "events.0.event_id",
         "NUL"),
        (json.dumps({"request_id": rid, "events": [event(item_id="i\x00")]}), "events.0.item_id", "NUL"),
        (json.dumps({"request_id": rid + "\x00", "events": [event(item_id=item)]}), "request_id", "NUL"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, value=1e308)]}), "events.0.value", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, value=-2e6)]}), "events.0.value",
         "max_event_value); got -2000000.0"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, ts=99999999999)]}), "events.0.ts",
         "]); got 99999999999.0"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, ts=now - 30 * 86400)]}), "events.0.ts", "last"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, ts=-1)]}), "events.0.ts", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, slot=n_slots)]}), "events.0.slot",
         f"slot count {n_slots}"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, slot=-1)]}), "events.0.slot", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id="not-on-the-page")]}), "events.0.item_id",
         "shown in slot 0"),
        (json.dumps({"request_id": rid, "events": [event(item_id=shown(mods, 1), slot=0)]}), "events.0.item_id",
         "shown in slot 0"),
        ("[" * 100_000 + "]" * 100_000, "body", "JSON"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item)]})[:-3] + ', "x": ' + "[" * 5000
         + "]" * 5000 + "}]}", "body", "JSON"),
        ('{"request_id": "' + rid + '", "events": [{"event_id": "n", "slot": NaN, "item_id": "x", "type": "play"}]}',
         "body", "JSON"),
        ('{"request_id": "' + rid + '", "events": [{"event_id": "n", "slot": 1e400, "item_id": "x", "type": "play"}]}',
         "body", "JSON"),
        ('{"request_id": "' + rid + '", "events": [{"event_id": "\\ud800", "slot": 0, "item_id": "x", "type": "play"}]}',
         "body", "JSON"),
        (b'{"request_id": "\xff\xfe", "events": []}', "body", "JSON"),
        (json.dumps({"request_id": rid, "events": []}).encode("utf-16"), "body", "JSON"),
        ("", "body", "JSON"),
        ("null", "body", "JSON object"),
        ("[]", "body", "JSON object"),
        ('"x"', "body", "JSON object"),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, slot=True)]}), "events.0.slot", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, slot=2**70)]}), "events.0.slot", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, slot=0.5)]}), "events.0.slot", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, type="purchase")]}), "events.0.type", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item)], "extra": 1}), "extra", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item)] * 1001}), "events", ""),
        (json.dumps({"request_id": rid, "events": [event(item_id=item, event_id="x" * 201)]}), "events.0.event_id", ""),
    ]
    for body, field, match in cases:
        r = post(server, body)
        assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, 400, field, match)
    r = post(server, json.dumps({"request_id": rid, "events": [event(item_id=item)]}), ctype="text/plain")
    assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, 400, "Content-Type")
    r = post(server, b"{" * (300 * 1024))  # over HOMEPAGE_MAX_BODY_BYTES (256 KiB)
    assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, 413, "body")
    # the events of a valid page are accepted: the slot's items, a value and a time within the limits
    ok = [event(item_id=it["item_id"], slot=m["slot"], value=2.5, ts=now - 60) for m in mods for it in m["items"][:1]]
    r = post(server, json.dumps({"request_id": rid, "events": ok}))
    assert r.status_code == 202 and r.json() == {"accepted": len(ok), "duplicates": 0}


def test_openapi_document_matches_the_server(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["operatorToken"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["operatorToken"][
            "description"]}
    secured = [(p, m) for p, ops in spec["paths"].items() for m, op in ops.items() if op.get("security")]
    assert ("/config", "put") in secured
    for p, m in secured:
        assert {"401", "403", "429"} <= set(spec["paths"][p][m]["responses"]), (p, m)
    param = next(q for q in spec["paths"]["/layout"]["get"]["parameters"] if q["name"] == "user_id")
    pattern = re.compile(param["schema"]["pattern"])
    samples = ["u1", "never-seen-ü", " a ", "a\x85", "\x85", "a\x00", "\u3000", "\ufeff", "\u00a0x", "tab\tx",
               "\u2028", "emoji-\U0001f600", "a\x7f", "a\x9f", "\x1c"]
    for u in samples:
        served = layout(server, user_id=u).status_code
        assert (served == 200) == (pattern.search(u) is not None), (u, served)


def test_routes_and_methods(server):
    for method, path, status in [("DELETE", "/layout", 405), ("GET", "/static/homepage.toml", 404),
                                 ("GET", "/../homepage.db", 404), ("PATCH", "/feedback", 405),
                                 ("GET", "/nope", 404)]:
        r = requests.request(method, server.url + path, timeout=10)
        assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, status)


def test_wrong_tokens_are_rate_limited(server):
    def put(token: str) -> requests.Response:
        return requests.put(server.url + "/config", data="x", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)

    got = [put(f"guess{k}").status_code for k in range(7)]
    assert got[:5] == [401] * 5 and got[5:] == [429, 429], got  # HOMEPAGE_TOKEN_FAILURES=5
    r = put("sesame")  # even the right token waits for the window (3 s) to pass
    assert_json_error(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content, 429)
    assert 1 <= int(r.headers["Retry-After"]) <= 3
    assert layout(server).status_code == 200  # requests without a token are not throttled
    time.sleep(3.1)
    assert put("guess").status_code == 401


def test_server_serves_normally_afterwards(server):
    d = layout(server, user_id="after").json()
    ev = [{"event_id": "after-1", "slot": 0, "item_id": shown(d["modules"]), "type": "play"}]
    assert post(server, json.dumps({"request_id": d["request_id"], "events": ev})).status_code == 202
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200


# ---- pure parts, against hand-written answers ----------------------------------------------------
def test_scanner_finds_the_end_of_pipelined_and_chunked_requests():
    a = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    assert RequestScanner().feed(a + b) == len(a)
    sc = RequestScanner()
    for k in range(len(b)):  # fed a byte at a time: complete only at the last byte
        assert sc.feed(b[:k]) is None
    assert sc.feed(b) == len(b)
    c = b"POST /c HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nabcd"
    sc = RequestScanner()
    assert sc.feed(c) == len(c) and sc.expect_continue
    assert sc.new_head == b"POST /c HTTP/1.1\r\nContent-Length: 4\r\n\r\n"


def test_readyz_error_texts_are_redacted():
    body = {"ready": False, "reason": "engine not loaded: database unreachable: (psycopg.OperationalError) "
                                      "connection to server at 10.0.0.7 failed: password authentication failed",
            "log": {"last_error": "OperationalError: SELECT secret FROM t", "written": 3},
            "loop": {"steps": {"plan": {"detail": "IntegrityError: INSERT ...", "runs": 2}}}}
    red = _redacted(body)
    text = json.dumps(red)
    assert "10.0.0.7" not in text and "SELECT" not in text and "INSERT" not in text
    assert red["log"]["written"] == 3 and red["loop"]["steps"]["plan"]["runs"] == 2
    assert red["reason"].startswith("engine not loaded ") and red["log"]["last_error"].startswith("OperationalError ")


def test_http_limits_name_the_variable(monkeypatch):
    from policy_api.serving._app import HttpLimits

    monkeypatch.setenv("HOMEPAGE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("HOMEPAGE_HEADER_TIMEOUT_S", "2.5")
    got = HttpLimits.from_env()
    assert (got.max_body_bytes, got.header_timeout_s, got.body_timeout_s) == (2048, 2.5, 30.0)
    monkeypatch.setenv("HOMEPAGE_BODY_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match=r"HOMEPAGE_BODY_TIMEOUT_S must be a number in \[0.1, 3600\]; got 'soon'"):
        HttpLimits.from_env()
