"""textclf/collector.py: Python's collector paused while a process imports vLLM and builds an engine, the imports'
objects frozen, the rest left collectable (tests/test_engine_preload.py checks the engine server's,
serve_app/engine_server.py)."""

import gc
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


def test_paused_inside_then_on_again_with_the_imports_frozen_and_the_rest_collectable():
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        before = weakref.ref(Cycle())  # unreachable at once, like what imports leave: frozen with them, kept
        freeze_imports()
        kept = Cycle()  # alive on leaving (an engine): not frozen, collected once dropped
        after = weakref.ref(Cycle())  # unreachable after the imports: the last collection frees it
    assert gc.isenabled()
    assert after() is None
    dropped = weakref.ref(kept)
    del kept
    gc.collect()
    assert dropped() is None
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
