"""What the replica's engine server imports (serve_app/engine_preload.py): vLLM's engine modules, with Python's
collector paused while it does and their objects frozen after (textclf/collector.py). An EngineCore forked from the
server inherits them frozen, so the full collections vLLM runs as it builds the engine skip them."""

from importlib import import_module

from serve_app.engine_preload import ENGINE_MODULES
from textclf.collector import collector_paused, freeze_imports

with collector_paused():
    for name in ENGINE_MODULES:
        try:
            import_module(name)
        except ImportError:  # the EngineCore process imports it again, and fails there with vLLM's own error
            pass
    freeze_imports()
