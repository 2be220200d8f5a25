"""Python's cyclic garbage collector while a process imports vLLM and builds an engine.

Importing torch, transformers and vLLM creates about a million objects that live as long as the process, and the
collector scans the growing heap again and again while they are created; vLLM then runs full collections of its own
as it builds an engine (after loading the weights, before freezing its heap). Together they took about 2 s of a
CPU engine's start (bench/results/engine-start.md, "The garbage collector"). With the collector paused during the
imports and those objects frozen (`gc.freeze`: collections skip them from then on), neither happens.

Freezing keeps what the imports left unreachable (~14,000 objects, against ~1,000,000 kept) for the process's life:
collecting it first would cost a full scan (~0.4 s). Only the imports are frozen here, not the engine: Ray Serve (after
a replica's constructor) and vLLM's EngineCore (after its build, undone when it shuts down) freeze their heaps
themselves, and an engine built and dropped in one process must stay collectable.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside; on leaving, what is unreachable is collected (call freeze_imports() after the
    imports inside, so that this scans only what came after) and the collector is on again if it was. Nested uses
    leave it off until the outermost ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if enabled:
            gc.enable()


def freeze_imports() -> None:
    """Freeze every object now alive, unreachable ones included: called once the heavy imports are done, so that
    later collections (vLLM's own, collector_paused's last) skip the modules' objects."""
    gc.freeze()
