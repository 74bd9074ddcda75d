"""The RPC server's request parsing, fuzzed over a valid mutual-TLS connection.

Every generated request (bad request lines, header names and values, Content-Length values,
chunked framing, truncated and garbage bodies) must get a well-formed answer or a closed
connection within a bound, never a hang, with no ERROR record or traceback in the server's
log, while a good client's calls succeed during and after. ``BIGEXEC_FUZZ_EXAMPLES`` sets the
number of examples (a longer soak by hand); CI runs a modest number.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rpc import _tls_pair, serving

from bigexec.rpc import codec, wire
from bigexec.rpc.client import Client

EXAMPLES = int(os.environ.get("BIGEXEC_FUZZ_EXAMPLES", "400"))
pytestmark = pytest.mark.timeout(max(300, EXAMPLES // 20))  # a soak runs ~100 cases a second
#: What an answer may be: success, a method's error, or a refusal.
ANSWERS = {200, 400, 404, 405, 413, wire.STATUS_APP_ERROR}
#: Long enough for any answer on a loaded machine; a hang runs into it.
EXCHANGE_SECONDS = 15.0
DECIDE_SECONDS = 5.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def target():
    """A TLS server, a client context for raw connections, the server's log records, and a
    good client calling in a loop in the background for the whole module."""
    server_ssl, client_ssl = _tls_pair()
    logger = logging.getLogger("bigexec")
    records = _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    stop = threading.Event()
    good: list[object] = []
    try:
        with serving(server_ssl, client_ssl) as (server, client):
            def call_in_a_loop() -> None:
                other = Client(client_ssl)
                try:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        try:
                            good.append(other.call(server.addr, "Echo.echo", (i,), {},
                                                   timeout=30) == i)
                        except Exception as exc:  # recorded, asserted on below
                            good.append(exc)
                        stop.wait(0.02)
                finally:
                    other.close()

            caller = threading.Thread(target=call_in_a_loop, daemon=True)
            caller.start()
            try:
                yield server, client, client_ssl, records
            finally:
                stop.set()
                caller.join(timeout=60)
            assert good and all(x is True for x in good), [x for x in good if x is not True]
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def _exchange(port: int, client_ssl: ssl.SSLContext, data: bytes,
              decided: bool) -> tuple[bytes, str | None, str]:
    """Send ``data`` on a new TLS connection and read until the server closes; return what
    came back, what went wrong if anything, and our end's address as the server names it.

    When the request is ``decided`` the server must answer (or close) before we close our
    sending side; then, or at once for a request that may wait for more, we close it (a bare
    FIN: TLS has no half-close) and the server must close within ``EXCHANGE_SECONDS``.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_SECONDS)
    sock = client_ssl.wrap_socket(raw, server_hostname="127.0.0.1")
    out = b""
    host, port_ = sock.getsockname()[:2]
    me = f"{host}:{port_}"
    try:
        try:
            sock.sendall(data)
        except (ssl.SSLError, ConnectionError):  # refused and closed before we finished
            return out, None, me
        deadline = time.monotonic() + (DECIDE_SECONDS if decided else 0)
        sent_fin = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (decided and _answered(out)):
                if sent_fin:
                    return out, f"the server did not close within {EXCHANGE_SECONDS}s", me
                if not _answered(out) and decided:
                    return out, f"no answer within {DECIDE_SECONDS}s to a whole request", me
                try:
                    socket.socket.shutdown(sock, socket.SHUT_WR)  # the server sees the end
                except OSError:
                    return out, None, me
                sent_fin, decided = True, False
                deadline = time.monotonic() + EXCHANGE_SECONDS
                continue
            sock.settimeout(left)
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionError):  # closed, by a TLS alert or a reset
                return out, None, me
            if not got:
                return out, None, me
            out += got
    finally:
        sock.close()


def _answered(reply: bytes) -> bool:
    """Whether ``reply`` holds a whole answer (its body too), or a streamed one begun."""
    head, sep, rest = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for h in head.split(b"\r\n")[1:]:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return True


def _statuses(reply: bytes) -> list[int | None]:
    """The status of each answer in ``reply`` (None for one that is not HTTP)."""
    out: list[int | None] = []
    rest = reply
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if not sep or len(line) < 2 or line[0] != b"HTTP/1.1" or not line[1].isdigit():
            return [*out, None]
        out.append(int(line[1]))
        length = 0
        for h in head.split(b"\r\n")[1:]:
            name, _, value = h.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"transfer-encoding":
                return out  # a streamed reply: its status is what matters here
        rest = rest[length:]
    return out


# --- strategies -----------------------------------------------------------------------

LINE_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=255,
                                  blacklist_characters="\r\n"), max_size=40)
VERBS = st.one_of(st.sampled_from(["POST", "GET", "PUT", "post", "", "POST POST"]), LINE_TEXT)
TARGETS = st.one_of(
    st.sampled_from(["/bigrpc/Echo.echo", "/bigrpc/Echo.add", "/bigrpc/Streams.digest",
                     "/bigrpc/Echo", "/", "/bigrpc/No.such", "/x/bigrpc/Echo.echo?q=1",
                     "/bigrpc/.", "/bigrpc/Echo.__init__", "/bigrpc/Echo._private"]),
    LINE_TEXT)
VERSIONS = st.one_of(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]),
                     LINE_TEXT)
REQUEST_LINES = st.one_of(
    st.builds(lambda v, t, h: f"{v} {t} {h}".encode("latin-1"), VERBS, TARGETS, VERSIONS),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(["Content-Length", "Transfer-Encoding", "X-Bigexec-Timeout",
                     "X-Bigexec-Call", "Host", "Connection", "content-length", " Content-Length",
                     "Content-Length "]),
    LINE_TEXT)
HEADER_VALUES = st.one_of(
    st.sampled_from(["chunked", "Chunked", "gzip, chunked", "close", "nan", "inf", "-1",
                     "1e400", "0", ""]),
    LINE_TEXT)
LENGTHS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(0, 1 << 20).map(str),
    st.sampled_from(["", " 5", "5 ", "0x10", "1e3", "+5", "5_0", "٣", "9" * 30]),
    LINE_TEXT)


def _message(value: object) -> bytes:
    return codec.dumps_bytes(value)


GOOD_CALLS = st.sampled_from([
    _message(((1,), {})), _message(((1, 2), {})), _message(((b"x" * 70_000,), {})),
    _message(((bytearray(100_000),), {})), _message(((), {"x": 1})),
])
WRONG_SHAPES = st.sampled_from([_message(42), _message(None), _message(("a", "b", "c")),
                                _message(((1,),)), _message(([1], {}))])
# Garbage without the opcodes that load globals or index a huge memo: unpickling a call is
# trusted (peers are authenticated), so the fuzzer must not import arbitrary modules.
_UNSAFE_OPCODES = b"ci\x93\x82\x83\x84rp"
GARBAGE = st.binary(max_size=300).map(lambda b: b.translate(None, _UNSAFE_OPCODES))
BODIES = st.one_of(
    GOOD_CALLS, WRONG_SHAPES, GARBAGE,
    st.tuples(GOOD_CALLS, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
    st.tuples(GARBAGE, GARBAGE).map(lambda t: t[0][:4] + (len(t[1]) + 8).to_bytes(8, "little")
                                    + t[1]),
)


def _chunked(frames: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Chunked framing, mostly right and now and then wrong: sizes, CRLFs, frames, the end."""
    frames = [b"H" + draw(st.one_of(GOOD_CALLS, BODIES))]
    frames += draw(st.lists(st.one_of(
        st.binary(max_size=40).map(lambda b: b"D" + b), st.just(b"Z"), st.binary(max_size=20)),
        max_size=4))
    out = b""
    for frame in frames:
        size = draw(st.one_of(
            st.just(b"%x" % len(frame)), st.just(b"%X" % len(frame)),
            st.just(b"%x;ext=1" % len(frame)), BAD_CHUNK_SIZES,
            st.integers(0, 2**64).map(lambda n: b"%x" % n)))
        end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"", b"xx"]))
        out += size + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])) + frame + end
    return out + draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n", b"", b"0\r\nX: y\r\n\r\n"]))


BAD_CHUNK_SIZES = st.sampled_from([b"ffffffffff", b"-1", b"-0", b"+5", b"0x5", b"5_0", b"zz",
                                   b"", b" ", b"f" * 17, b"1 1", b"\x00"])
GOOD_STREAM_FRAMES = st.lists(st.binary(min_size=1, max_size=30).map(lambda b: b"D" + b),
                              max_size=3).map(lambda ds: [*ds, b"Z"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A request with one part fuzzed and the rest right (or, now and then, all of it), and
    whether it is *decided*: the server has all it needs to answer without more bytes."""
    target = draw(st.sampled_from([b"/bigrpc/Echo.echo", b"/bigrpc/Echo.add",
                                   b"/bigrpc/Streams.digest"]))
    line = b"POST " + target + b" HTTP/1.1"
    headers = [("Host", "x"), ("X-Bigexec-Call", "fuzz")]
    call = draw(GOOD_CALLS)
    chunked = draw(st.booleans())
    frames = [b"H" + call, *draw(GOOD_STREAM_FRAMES)]
    body = _chunked(frames) if chunked else call
    part = draw(st.sampled_from(["line", "header", "length", "chunk-size", "chunk-end", "body",
                                 "cut", "all"]))
    decided = True
    if part == "line":
        line = draw(REQUEST_LINES)
    elif part == "header":
        name, value = draw(HEADER_NAMES), draw(HEADER_VALUES)
        headers.insert(draw(st.integers(0, len(headers))), (name, value))
        decided = name.strip().lower() not in ("content-length", "transfer-encoding")
    elif part == "length":  # Content-Length values, once or twice; a large one waits
        chunked = False
        headers += [("Content-Length", v) for v in draw(st.lists(LENGTHS, min_size=1,
                                                                 max_size=2))]
        decided = False
    elif part == "chunk-size":  # a bad size token on one frame
        chunked = True
        at = draw(st.integers(0, len(frames) - 1))
        body = (_chunked(frames[:at])[:-5] + draw(BAD_CHUNK_SIZES) + b"\r\n" + frames[at]
                + b"\r\n" + _chunked(frames[at + 1 :]))
    elif part == "chunk-end":  # a frame not followed by CRLF, or a bad last chunk
        chunked = True
        at = draw(st.integers(0, len(frames) - 1))
        body = (_chunked(frames[:at])[:-5] + b"%x\r\n" % len(frames[at]) + frames[at]
                + draw(st.sampled_from([b"xx", b"\n0", b"\r0", b"00"])) + b"\r\n"
                + _chunked(frames[at + 1 :]))
        decided = False
    elif part == "body":  # garbage, cut or wrongly shaped call messages, framed right
        message = draw(BODIES)
        body = _chunked([b"H" + message, b"Z"]) if chunked else message
    elif part == "cut":
        decided = False
    else:
        chunked = draw(st.booleans())
        body = draw(chunked_bodies()) if chunked else draw(BODIES)
        line = draw(st.one_of(REQUEST_LINES, st.just(line)))
        headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
        decided = False
    if part != "length" and (part != "all" or draw(st.booleans())):
        headers.append(("Transfer-Encoding", "chunked") if chunked
                       else ("Content-Length", str(len(body))))
    order = draw(st.permutations(headers))
    data = line + b"\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in order) + b"\r\n"
    data += body
    if part in ("cut", "all"):  # cut anywhere
        data = data[: draw(st.integers(0, len(data)))]
    if part == "all" and draw(st.integers(0, 4)) == 0:  # a stray CR or LF anywhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\r", b"\n", b"\r\n"])) + data[at:]
    return data, decided


CASES = {"tried": 0}


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=requests())
def test_fuzzed_requests_get_an_answer_or_a_close_never_a_hang(target, case):
    server, client, client_ssl, records = target
    data, decided = case
    CASES["tried"] += 1
    seen = len(records.records)
    reply, wrong, me = _exchange(server.port, client_ssl, data, decided)
    assert wrong is None, (wrong, data[:300], reply[:300])
    statuses = _statuses(reply)
    assert all(s in ANSWERS for s in statuses), (statuses, reply[:300], data[:300])
    # Every record so far: an earlier connection's server thread may log after its client
    # saw the end (TLS answers our bare FIN with an alert at once).
    _assert_quiet(records.records)
    # one warning at most for our connection (the server logs it before it answers; after
    # a close without an answer it may come later, and the port may be reused by then)
    warned = [r.getMessage() for r in records.records[seen:] if r.levelno == logging.WARNING
              and _peer(r.getMessage()) == me]
    assert len(warned) <= 1, warned
    assert client.call(server.addr, "Echo.echo", (b"ok",), {}, timeout=30) == b"ok"


def test_the_server_serves_after_the_fuzzing(target):
    server, client, _, records = target
    assert client.call(server.addr, "Echo.add", (2, 3), {}, timeout=30) == 5
    assert not server.closed
    time.sleep(0.5)  # the last connections' threads are done logging
    _assert_quiet(records.records)
    print(f"fuzz cases tried: {CASES['tried']}")


def _peer(message: str) -> str:
    """The peer a warning names (the whole message if it names none)."""
    found = re.search(r" from (\S+): ", message)
    return found.group(1) if found else message


def _assert_quiet(records: list[logging.LogRecord]) -> None:
    """No record at ERROR or above, and none with a traceback."""
    bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.getMessage(), r.exc_text) for r in bad]
