"""Run as ``__main__`` by test_namespaces.py: ``python namespaces_main.py SYSTEM``.

Everything here is defined in ``__main__``, so it is pickled by value, as a user's script is.
Each scenario's outcome (or the error it raised, as text) is printed as one JSON object.
"""

import concurrent.futures as cf
import gc
import json
import multiprocessing
import sys
import time
import weakref

import bigexec

CONF = None
REGISTRY = {}
VALUE = "first"
COUNT = 0
REFS = []  # the driver's own list (weak references to objects made on threads machines)


def init(v):
    global CONF
    CONF = v


def task(_):
    return CONF


def init_machine_only(v):
    global ONLY_ON_MACHINE
    ONLY_ON_MACHINE = v


def read_machine_only(_):
    return ONLY_ON_MACHINE  # noqa: F821 - defined by the initializer, on the machine


def init_in_place(v):
    REGISTRY["key"] = v


def read_in_place(_):
    return REGISTRY.get("key")


def init_value(v):
    global VALUE
    VALUE = v


def read_value():
    return VALUE


def helper():
    return "helper v1"


def call_helper():
    return helper()


def shown():
    return "shown v1"


def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)


def make_adder(k):
    def add(x):
        return x + k
    return add


def count_once():
    global COUNT
    COUNT += 1


def read_count(_):
    return COUNT


class Marker:
    pass


SCALE = 1


class Point:
    def scale(self):
        return SCALE


def make_point(_):
    return Point()


def init_marker():
    global BOX
    BOX = [Marker()]  # a list: what is shipped back from it is held strongly until it stops
    sys.modules["__main__"].REFS.append(weakref.ref(BOX[0]))  # the driver's real module


def read_box():
    return type(BOX[0]).__name__


def box_reader(_):
    return read_box  # shipped back to the driver by value, BOX with it


class Service:
    """A service whose methods read module globals, like the tasks."""

    def conf(self):
        return CONF

    def bump(self):
        global COUNT
        COUNT += 1
        return COUNT


def stdlib_reference():
    out = {}
    with cf.ProcessPoolExecutor(3, initializer=init, initargs=("set",)) as ex:
        out["executor_map"] = list(ex.map(task, range(3)))
        out["executor_submit"] = [ex.submit(task, i).result() for i in range(3)]
    with multiprocessing.Pool(3, initializer=init, initargs=("set",)) as pool:
        out["pool_map"] = pool.map(task, range(3))
        out["pool_apply"] = [pool.apply(task, (i,)) for i in range(3)]
        out["pool_imap"] = list(pool.imap(task, range(3)))
    with cf.ProcessPoolExecutor(2, initializer=init_machine_only, initargs=("mine",)) as ex:
        out["machine_only"] = list(ex.map(read_machine_only, range(2)))
    with cf.ProcessPoolExecutor(2, initializer=init_in_place, initargs=("put",)) as ex:
        out["in_place"] = list(ex.map(read_in_place, range(2)))
    return out


def initializers(system):
    out = {}
    with bigexec.Executor(3, system=system, initializer=init, initargs=("set",)) as ex:
        out["executor_map"] = list(ex.map(task, range(3)))
        out["executor_submit"] = [ex.submit(task, i).result() for i in range(3)]
    with bigexec.Pool(3, system=system, initializer=init, initargs=("set",)) as pool:
        out["pool_map"] = pool.map(task, range(3))
        out["pool_apply"] = [pool.apply(task, (i,)) for i in range(3)]
        out["pool_imap"] = list(pool.imap(task, range(3)))
    return out


def machine_only(system):
    out = {}
    with bigexec.Executor(2, system=system, initializer=init_machine_only,
                          initargs=("mine",)) as ex:
        out["machine_only"] = list(ex.map(read_machine_only, range(2)))
    with bigexec.Pool(2, system=system, initializer=init_machine_only,
                      initargs=("mine",)) as pool:
        out["machine_only_pool"] = pool.map(read_machine_only, range(2))
    return out


def in_place(system):
    with bigexec.Executor(2, system=system, initializer=init_in_place, initargs=("put",)) as ex:
        return {"in_place": list(ex.map(read_in_place, range(2)))}


def rebinding(system):
    global VALUE
    out = {}
    with bigexec.Executor(1, system=system, initializer=init_value,
                          initargs=("set by the machine",)) as ex:
        before = ex.submit(read_value).result()
        VALUE = "rebound by the driver"
        after = ex.submit(read_value).result()
        again = ex.submit(read_value).result()
    out["rebinding"] = [before, after, again]
    return out


def code(system):
    out = {}
    with bigexec.Executor(1, system=system) as ex:
        first = [ex.submit(call_helper).result(), ex.submit(shown).result()]

        def helper_v2():
            return "helper v2"

        def shown_v2():
            return "shown v2"

        # defined again in __main__'s namespace, as a notebook cell run again would
        globals()["helper"], globals()["shown"] = helper_v2, shown_v2
        second = [ex.submit(call_helper).result(), ex.submit(globals()["shown"]).result()]
        out["redefined"] = [first, second]
        k = 10
        out["lambda"] = ex.submit(lambda x: x + k, 1).result()
        out["closure"] = ex.submit(make_adder(5), 1).result()
        out["recursion"] = ex.submit(fact, 5).result()
    return out


def driver_classes(system):
    """The driver's own class is left as it is when an instance comes back from a machine."""
    global SCALE
    with bigexec.Executor(1, system=system) as ex:
        back = ex.submit(make_point, 0).result()
    SCALE = 5
    return {"driver_class": [isinstance(back, Point), back.scale(), Point().scale()]}


def services(system):
    out = {}
    with bigexec.start(system) as b:
        machines = b.start(2, services={"S": Service()})
        for m in machines:
            m.wait(bigexec.RUNNING)
        # each machine has its own namespace: each counts its own calls
        out["two_machines"] = sorted(m.call("S.bump") for m in machines)
        with bigexec.Executor(machines=machines, initializer=init, initargs=("set",)) as ex:
            list(ex.map(task, range(2)))
            # the initializer runs as the executor's service reaches each machine, which may
            # be after the map (on the other machine) is done: wait for both, bounded
            deadline = time.monotonic() + 30
            while True:
                confs = [m.call("S.conf") for m in machines]
                if confs == ["set", "set"] or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            out["service_sees_initializer"] = confs
            # tasks on the machine see what its service did to the module's globals
            out["task_sees_service"] = sorted(ex.map(read_count, range(6)))
    return out


def collectable(system):
    """On threads: the namespace of a stopped machine (and what it holds) can be collected."""
    if system != "threads":
        return {}  # a local machine's namespaces end with its process
    with bigexec.Executor(1, system="threads", initializer=init_marker) as ex:
        alive = ex.submit(box_reader, 0).result()()
    del ex
    deadline = time.monotonic() + 10  # the session's last threads may still be ending
    while REFS[0]() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    return {"collectable": [alive, len(REFS), REFS[0]() is None]}


if __name__ == "__main__":
    system = sys.argv[1]
    results = {"stdlib": stdlib_reference(), "bigexec": {}}
    for scenario in (initializers, machine_only, in_place, rebinding, code, driver_classes,
                     services, collectable):
        try:
            results["bigexec"].update(scenario(system))
        except Exception as exc:  # the test that looks for this scenario's keys shows it
            results["bigexec"][scenario.__name__] = f"ERROR {type(exc).__name__}: {exc}"
    print(json.dumps(results))
