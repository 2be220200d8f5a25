"""serve_app/replica_logs.py: a replica's log buffer survives a logging configuration applied while its engine starts
(vLLM's engine applies one, which closes every handler of the process). The real replica's log file is checked in
test_serve.py."""

import logging
import logging.config
from logging.handlers import MemoryHandler

from serve_app.replica_logs import log_buffers_kept


def test_a_log_buffer_closed_during_the_block_writes_again_after_it(tmp_path):
    path = tmp_path / "replica.log"
    target = logging.FileHandler(path)
    buffer = MemoryHandler(capacity=1000, target=target, flushLevel=logging.ERROR)  # as Ray Serve's replica logger
    log = logging.getLogger("test.replica_logs")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(buffer)
    try:
        with log_buffers_kept():
            logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM applies
            assert buffer.target is None, "the configuration no longer closes the handlers: this test shows nothing"
            log.info("during the engine's start")
        assert path.read_text().splitlines() == ["during the engine's start"]  # written out at the block's end
        log.info("a request")
        log.error("a failure")  # flushLevel: written at once
        assert path.read_text().splitlines() == ["during the engine's start", "a request", "a failure"]
    finally:
        log.removeHandler(buffer)
        buffer.close()


def test_a_buffer_without_a_target_before_the_block_is_left_alone():
    buffer = MemoryHandler(capacity=10)
    log = logging.getLogger("test.replica_logs.none")
    log.addHandler(buffer)
    try:
        with log_buffers_kept():
            pass
        assert buffer.target is None
    finally:
        log.removeHandler(buffer)
