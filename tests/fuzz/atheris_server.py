"""Coverage-guided fuzzing of the RPC server's request parsing with atheris (run by hand,
not in CI: ``pip install atheris``, then from the repository's root)::

    .venv/bin/python tests/fuzz/atheris_server.py -runs=100000
    .venv/bin/python tests/fuzz/atheris_server.py -max_total_time=300

Each input is one of: bytes sent to a real ``Server`` on a loopback connection (which must
be answered or closed within ``EXCHANGE_SECONDS``, with a status the server may give, and no
ERROR record or traceback in its log), a message for ``codec.read``/``codec.loads``, or a
chunked body for ``wire.Stream``; the first byte says which. A finding raises, and atheris
saves the input as ``crash-*``. Bodies have the pickle opcodes that import or grow the memo
removed: unpickling is trusted (peers are authenticated), the fuzzer must not run code, nor
make the unpickler grow its memo to the index a LONG_BINPUT names (gigabytes from 5 bytes:
the first run here found that, through a head ended by a bare LF).
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import time

import atheris

with atheris.instrument_imports(include=["bigexec"]):
    from bigexec.errors import BigexecError
    from bigexec.rpc import codec, wire
    from bigexec.rpc.server import Server
    from bigexec.service import ServiceRegistry

EXCHANGE_SECONDS = 10.0
ANSWERS = {b"200", b"400", b"404", b"405", b"413", b"590"}
_UNSAFE_OPCODES = b"ci\x93\x82\x83\x84rp"


class Echo:
    def echo(self, x):
        return x


class Streams:
    def read(self, stream):
        return len(stream.read())


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


registry = ServiceRegistry()
registry.add("Echo", Echo())
registry.add("Streams", Streams())
server = Server(registry)
server.start()
failures = _Failures()
logging.getLogger("bigexec").addHandler(failures)
logging.getLogger("bigexec").setLevel(logging.WARNING)
logging.getLogger("bigexec").propagate = False  # one warning per refusal: not on stderr


def _safe_body(data: bytes) -> bytes:
    """``data`` with the unsafe opcodes taken out of everything past the first place a head
    may end (a line that is empty, with or without its CR: the server takes both)."""
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    if not ends:
        return data
    at = min(ends) + 1
    return data[:at] + data[at:].translate(None, _UNSAFE_OPCODES)


def _exchange(data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=EXCHANGE_SECONDS) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return
        out = b""
        deadline = time.monotonic() + EXCHANGE_SECONDS
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                got = s.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no close within {EXCHANGE_SECONDS}s") from None
            except OSError:
                break
            if not got:
                break
            out += got
    if out and out[9:12] not in ANSWERS:
        raise AssertionError(f"unexpected answer {out[:100]!r}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    kind, data = data[0] % 3, data[1:]
    if kind == 0:
        _exchange(_safe_body(data))
        time.sleep(0)  # let the connection's thread log before we look
    elif kind == 1:
        data = data.translate(None, _UNSAFE_OPCODES)
        try:
            codec.loads(codec.read(io.BytesIO(data).readinto, len(data)))
        except (EOFError, codec.DecodeError):
            pass
    else:
        stream = wire.Stream(io.BufferedReader(io.BytesIO(data)))
        try:
            stream.read()
        except (BigexecError, ValueError):  # ProtocolError, NetworkError, a sent error
            pass
    if failures.records:
        record = failures.records[0]
        raise AssertionError(f"server logged {record.getMessage()}: {record.exc_text}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
