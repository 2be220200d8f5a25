"""Keep a replica's own log file alive across vLLM's engine start.

vLLM (0.32) applies its logging configuration when an engine is built (`vllm.logger.configure_logging`, a
non-incremental `logging.config.dictConfig`), which closes every handler in the process. Ray Serve writes a
replica's log through a `logging.handlers.MemoryHandler`; closed, it drops its target, so every later record of the
replica (its start-up lines, its errors) is kept in memory and never written.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from typing import Iterator


def memory_handlers() -> list[MemoryHandler]:
    """Every MemoryHandler attached to the root logger or a named one."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, MemoryHandler)]


@contextmanager
def log_buffers_kept() -> Iterator[None]:
    """Gives back each log buffer's target that the block took away, then writes out what the buffers hold, so a
    replica's start-up lines reach its log file now, not after a thousand more records."""
    targets = {h: h.target for h in memory_handlers() if h.target is not None}
    try:
        yield
    finally:
        for handler, target in targets.items():
            if handler.target is None:
                handler.setTarget(target)  # a closed FileHandler (mode "a") opens its file again on the next record
            handler.flush()
