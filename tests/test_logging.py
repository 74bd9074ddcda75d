"""bigexec's logging manners: a NullHandler on its logger, and the process's logging untouched.

Each check runs in a fresh interpreter: what is asserted is the state of the process's
logging after bigexec ran there, which another test in this process could have changed first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=50)


def test_the_bigexec_logger_has_a_null_handler_and_stays_quiet_unconfigured():
    proc = _run("""
        import logging
        import bigexec
        handlers = logging.getLogger("bigexec").handlers
        assert any(type(h) is logging.NullHandler for h in handlers), handlers
        logging.getLogger("bigexec.machine").warning("a warning nobody asked to see")
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert proc.stderr == "", "without logging set up, bigexec must print nothing"


_THREADS = """
    import json, logging
    import bigexec
    from bigexec.logs import MachineFilter

    class Talker:
        def say(self, text):
            logging.getLogger("myapp.service").warning("service says %s", text)
            logging.getLogger("bigexec.test.talker").warning("bigexec logger says %s", text)
            return text

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append({"name": record.name, "message": record.getMessage(),
                         "machine": getattr(record, "machine", None)})

    def factory_id():
        f = logging.getLogRecordFactory()
        return (f.__module__, f.__qualname__)

    factory_before = factory_id()
    plain, marked = Keep(), Keep()
    marked.addFilter(MachineFilter())
    root = logging.getLogger()
    root.addHandler(plain)  # where an application puts its handlers
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Talker": Talker()})
        assert m.wait(bigexec.RUNNING, 20) and m.err is None, m.err
        m.call("Talker.say", "hello")
        logging.getLogger("myapp.driver").warning("the driver says hi")
        root.removeHandler(plain)
        root.addHandler(marked)
        m.call("Talker.say", "again")
        logging.getLogger("myapp.driver").warning("the driver again")
        label = m.addr.split("://", 1)[1]
    print(json.dumps({"label": label, "seen": seen, "factory_before": factory_before,
                      "factory_after": factory_id()}))
"""


@pytest.fixture(scope="module")
def threads_run():
    proc = _run(_THREADS)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _seen(run, message):
    (record,) = [r for r in run["seen"] if r["message"].endswith(message)]
    return record


def test_threads_leave_the_record_factory_alone(threads_run):
    assert threads_run["factory_after"] == threads_run["factory_before"]
    assert threads_run["factory_after"] == ["logging", "LogRecord"]


def test_the_users_records_are_not_touched(threads_run):
    # logged in a machine and out of it, through a handler of the user's with no filter
    assert _seen(threads_run, "service says hello") == {
        "name": "myapp.service", "message": "service says hello", "machine": None}
    assert _seen(threads_run, "the driver says hi")["machine"] is None


def test_bigexec_loggers_records_still_say_their_machine(threads_run):
    label = threads_run["label"]
    rec = _seen(threads_run, "bigexec logger says hello")
    assert rec == {"name": "bigexec.test.talker", "machine": label,
                   "message": f"{label}: bigexec logger says hello"}


def test_machine_filter_marks_the_users_records_on_request(threads_run):
    label = threads_run["label"]
    rec = _seen(threads_run, "service says again")
    assert rec["machine"] == label and rec["message"] == f"{label}: service says again"
    assert _seen(threads_run, "the driver again")["machine"] == ""
