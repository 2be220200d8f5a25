"""textclf/collector.py: Python's collector paused while a process imports vLLM and builds an engine, its objects
frozen after; serve_app/engine_server.py, the engine server's imports, checked in a real forkserver."""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest

from textclf.collector import collector_paused, freeze_imports


@pytest.fixture(autouse=True)
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # what the tests froze is this test process's to collect again
    gc.enable() if enabled else gc.disable()


class Cycle:
    def __init__(self):
        self.me = self


def test_paused_inside_then_on_again_with_everything_alive_frozen():
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        before = weakref.ref(Cycle())  # unreachable at once, like what imports leave: frozen with them, kept
        freeze_imports()
        after = weakref.ref(Cycle())  # unreachable after the imports: the last collection frees it
    assert gc.isenabled()
    assert after() is None
    gc.collect()
    assert before() is not None  # frozen: no collection scans it


def test_nested_pauses_and_an_error_inside_leave_the_collector_as_it_was():
    gc.enable()
    with pytest.raises(RuntimeError):
        with collector_paused():
            with collector_paused():
                pass
            assert not gc.isenabled()  # the inner one does not turn it on under the outer
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()  # off before, off after


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


def test_an_engine_process_forked_from_the_server_has_vllm_imported_and_frozen_with_its_collector_on(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SERVER_CHILD)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["core"]  # imported by the server (serve_app/engine_server.py)
    assert out["frozen"] > 100_000  # vLLM's and torch's objects, skipped by the engine's collections
    assert out["enabled"]
