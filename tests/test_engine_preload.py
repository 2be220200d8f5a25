"""serve_app/engine_preload.py: the EngineCore process forked from a server that preloads vLLM. The process class in
a real forkserver (a light module preloaded, in a subprocess of its own: the forkserver is one per process), and the
name in vLLM it replaces; the server's own preload (serve_app/engine_server.py) in a real forkserver too;
tests/test_serve.py checks a replica's engine process."""

import inspect
import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, os, sys, threading
from multiprocessing import Pipe
from multiprocessing.forkserver import _forkserver

from serve_app.engine_preload import EnvironContext, start_server


def report(conn):
    import setproctitle

    setproctitle.setproctitle("VLLM::Probe")  # as vLLM names its engine process
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    started = []  # the niceness of a thread this process starts
    t = threading.Thread(target=lambda: started.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    t.start()
    t.join()
    conn.send({"late": os.environ.get("TEXTCLF_LATE"), "gone": os.environ.get("TEXTCLF_GONE"), "ppid": os.getppid(),
               "affinity": sorted(os.sched_getaffinity(0)), "comm": comm, "json": "json" in sys.modules,
               "nice": os.nice(0), "thread_nice": started[0]})


if __name__ == "__main__":
    everything = os.sched_getaffinity(0)
    os.environ["TEXTCLF_GONE"] = "set when the server started"
    os.sched_setaffinity(0, {min(everything)})
    start_server(["serve_app.engine_preload", "json"])
    os.sched_setaffinity(0, everything)
    os.environ["TEXTCLF_LATE"] = "set after the server started"
    del os.environ["TEXTCLF_GONE"]
    parent, child = Pipe()
    p = EnvironContext(nice=3).Process(target=report, args=(child,))
    p.start()
    out = parent.recv()
    p.join(30)
    server = _forkserver._forkserver_pid
    print(json.dumps({**out, "me": os.getpid(), "server": server, "exitcode": p.exitcode, "my_nice": os.nice(0),
                      "server_nice": os.getpriority(os.PRIO_PROCESS, server)}))
"""


def run_child(tmp_path, code: str, timeout: int = 120) -> dict:
    """Run `code` as a script of its own (a forkserver is one per process); the JSON of its last line."""
    script = tmp_path / "child.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to tell the server's from the parent's")
def test_a_child_has_its_parents_environment_at_start_and_the_servers_cores(tmp_path):
    out = run_child(tmp_path, CHILD)
    assert out["exitcode"] == 0
    assert out["ppid"] == out["server"] != out["me"]  # forked by the server, not spawned by the parent
    assert out["late"] == "set after the server started" and out["gone"] is None  # the parent's, at start()
    assert out["affinity"] == [min(os.sched_getaffinity(0))]  # the server's cores (the engine's, in a replica)
    assert out["comm"] == "VLLM::Probe"  # setproctitle still names the process after its environment is replaced
    assert out["json"]  # imported by the server before the fork
    assert out["nice"] == out["thread_nice"] == out["my_nice"] + 3  # below its parent, and so are its threads
    assert out["server_nice"] == out["my_nice"]  # the parent and the server keep theirs


SERVER_CHILD = r"""
import gc, json, sys
from multiprocessing import Pipe

from serve_app.engine_preload import EnvironContext, start_server


def report(conn):
    core = "vllm.v1.engine.core" in sys.modules
    conn.send({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "core": core})


if __name__ == "__main__":
    start_server()
    parent, child = Pipe()
    p = EnvironContext().Process(target=report, args=(child,))
    p.start()
    print(json.dumps(parent.recv()))
    p.join(30)
"""


def test_an_engine_process_forked_from_the_real_server_has_vllm_imported_and_frozen_with_its_collector_on(tmp_path):
    """serve_app/engine_server.py, the server's default preload: vLLM's engine modules imported with the collector
    paused and frozen (textclf/collector.py), so the collections vLLM runs as it builds the engine skip them."""
    out = run_child(tmp_path, SERVER_CHILD, timeout=300)
    assert out["core"]  # imported by the server (serve_app/engine_server.py)
    assert out["frozen"] > 100_000  # vLLM's and torch's objects, skipped by the engine's collections
    assert out["enabled"]


def test_vllm_starts_its_engine_processes_from_the_context_it_is_given():
    """engine_from_server replaces vllm.v1.engine.utils.get_mp_context, which vLLM's engine process manager calls
    for the context it starts EngineCore processes from; restored on exit."""
    import vllm.v1.engine.utils as engine_utils

    from serve_app.engine_preload import EnvironContext, engine_from_server

    assert "get_mp_context()" in inspect.getsource(engine_utils.CoreEngineProcManager.__init__)
    spawning = engine_utils.get_mp_context
    with engine_from_server(nice=7):
        ctx = engine_utils.get_mp_context()
        assert isinstance(ctx, EnvironContext) and ctx.get_start_method() == "forkserver"
        assert ctx.Process(target=print).nice == 7
    assert engine_utils.get_mp_context is spawning
