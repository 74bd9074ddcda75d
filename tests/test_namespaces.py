"""Functions shipped from one module share one namespace on each machine (bigexec.namespaces).

The end-to-end cases run namespaces_main.py as ``__main__`` in a subprocess, once per system:
functions of a pytest module are importable, so they would go by reference and prove nothing.
The stdlib runs there too, as the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from bigexec import namespaces
from bigexec.rpc import codec

SCRIPT = Path(__file__).with_name("namespaces_main.py")


@pytest.fixture(scope="module", params=["threads", "local"])
def run(request):
    """(system, the stdlib's results, bigexec's results) of namespaces_main.py on a system."""
    system = request.param
    proc = subprocess.run([sys.executable, str(SCRIPT), system], capture_output=True,
                          text=True, timeout=150, cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return system, results["stdlib"], results["bigexec"]


def _got(results, key, scenario):
    assert key in results, results.get(scenario, f"{scenario} did not run")
    return results[key]


@pytest.mark.parametrize("case", ["executor_map", "executor_submit", "pool_map", "pool_apply",
                                  "pool_imap"])
def test_what_an_initializer_sets_is_what_tasks_read_as_in_the_stdlib(run, case):
    _, stdlib, ours = run
    assert stdlib[case] == ["set"] * 3
    assert _got(ours, case, "initializers") == stdlib[case]


def test_a_global_only_the_initializer_defines_is_there_for_the_tasks(run):
    _, stdlib, ours = run
    assert stdlib["machine_only"] == ["mine", "mine"]
    assert _got(ours, "machine_only", "machine_only") == stdlib["machine_only"]
    assert _got(ours, "machine_only_pool", "machine_only") == stdlib["machine_only"]


def test_an_initializer_changing_a_shipped_dict_in_place_is_seen(run):
    _, stdlib, ours = run
    assert _got(ours, "in_place", "in_place") == stdlib["in_place"] == ["put", "put"]


def test_a_global_the_driver_rebinds_replaces_the_machines_copy(run):
    _, _, ours = run
    assert _got(ours, "rebinding", "rebinding") == [
        "set by the machine", "rebound by the driver", "rebound by the driver"]


def test_a_function_defined_again_in_the_driver_is_seen(run):
    _, _, ours = run
    assert _got(ours, "redefined", "code") == [["helper v1", "shown v1"],
                                              ["helper v2", "shown v2"]]


def test_lambdas_closures_and_recursion_still_work(run):
    _, _, ours = run
    got = [_got(ours, k, "code") for k in ("lambda", "closure", "recursion")]
    assert got == [11, 6, 120]


def test_two_machines_do_not_share_a_namespace(run):
    _, _, ours = run
    assert _got(ours, "two_machines", "services") == [1, 1]  # [1, 2]: one COUNT for both


def test_services_and_tasks_share_the_machines_namespace(run):
    _, _, ours = run
    assert _got(ours, "service_sees_initializer", "services") == ["set", "set"]
    assert _got(ours, "task_sees_service", "services") == [1] * 6


def test_the_drivers_own_class_is_kept_when_an_instance_comes_back(run):
    _, _, ours = run
    # isinstance holds, and the methods read the driver's SCALE (5), not the machine's copy
    assert _got(ours, "driver_class", "driver_classes") == [True, 5, 5]


def test_a_stopped_threads_machine_lets_its_namespace_go(run):
    system, _, ours = run
    if system == "threads":  # a local machine's namespaces end with its process
        assert _got(ours, "collectable", "collectable") == ["Marker", 1, True]


# --- in this process: places, the token rule, the sender token, the cloudpickle guard -------


def _module_functions():
    """Functions of a module that cannot be imported, so cloudpickle copies them by value."""
    g = {"__name__": "bigexec_test_not_importable", "X": [1]}
    exec("def read():\n    return X\n"
         "def write(v):\n    global X\n    X = v\n", g)
    return g


def _ship(obj, place):
    namespaces.set_current(place)
    try:
        return codec.loads(codec.dumps_bytes(obj))
    finally:
        namespaces.set_current(None)


def test_one_namespace_per_place_and_module():
    g = _module_functions()
    a, b = namespaces.Namespaces(), namespaces.Namespaces()
    read_a, write_a = _ship(g["read"], a), _ship(g["write"], a)
    read_b = _ship(g["read"], b)
    assert read_a.__globals__ is write_a.__globals__
    assert read_a.__globals__ is not read_b.__globals__
    assert read_a.__globals__ is not g


def test_the_machines_copy_stands_until_the_driver_rebinds_the_name():
    g = _module_functions()
    place = namespaces.Namespaces()
    _ship(g["write"], place)("machine's")
    assert _ship(g["read"], place)() == "machine's"  # same binding in the driver: kept
    g["X"] = [2]
    assert _ship(g["read"], place)() == [2]  # rebound in the driver: replaced
    g["X"].append(3)  # a change in place is not a rebinding
    _ship(g["write"], place)("again")
    assert _ship(g["read"], place)() == "again"


def test_a_closed_place_forgets_its_namespaces():
    g = _module_functions()
    place = namespaces.Namespaces()
    first = _ship(g["read"], place)
    place.close()
    assert _ship(g["read"], place).__globals__ is not first.__globals__


def test_a_forked_child_is_a_new_sender():
    parent = namespaces._sender
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its token and leave at once
        os.write(w, namespaces._sender.encode())
        os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 100).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert child and child != parent and namespaces._sender == parent


def test_the_cloudpickle_internals_are_checked_at_import(monkeypatch):
    assert namespaces._check_cloudpickle() == (namespaces._function_setstate,
                                               namespaces._class_setstate)
    # a release whose function state no longer carries the globals the function reads
    monkeypatch.setattr(cloudpickle.cloudpickle, "_function_getstate", lambda fn: ({}, {}))
    with pytest.raises(ImportError, match=r"cloudpickle.*installed: " + cloudpickle.__version__):
        namespaces._check_cloudpickle()
