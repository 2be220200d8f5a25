"""What a run shows on the console, and the run's log file that keeps everything.

Once a step knows its run folder (common.start_run / open_run), the driver's stdout and stderr become streams that
copy every line into <run>/logs/<step>.log and pass to the console only:
  - what the project's own code prints (print() called from a project module: the plan, results, errors);
  - the lines Ray forwards from workers (log_to_driver) that carry a project tag, e.g. "[train] step 10/140, ...";
  - log lines at ERROR or above.
Log records go to the file (INFO and up, any logger) and to the console when they are the project's warnings or
anyone's errors. With --verbose the console shows everything, as before. Stdlib only: every Ray worker imports it
(quiet_ray_workers, the runtime env's setup hook).
"""

from __future__ import annotations

import atexit
import io
import logging
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional, TextIO

# Modules whose print() output is meant for the user ("__main__": `python -m ray_jobs.<step>`).
PROJECT_MODULES = ("ray_jobs", "textclf", "bench", "serve_app", "cluster", "__main__")
# Tags of the project's lines printed inside Ray workers (they reach the driver through Ray's log forwarding).
WORKER_TAGS = ("[train]", "[plan]", "[prepare]", "[export]", "[eval]")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's prefix of a forwarded worker line: "(RayTrainWorker pid=12, ip=10.0.0.2) ", "(MapWorker(MapBatches(X)) pid=3) "
RAY_PREFIX = re.compile(r"^\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)\s?")
# Python logging's and Ray's line formats: "2026-01-02 10:11:12,345 ERROR ..." / "2026-01-02 10:11:12,345\tERROR ..."
ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(ERROR|CRITICAL)\b")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PENDING_MAX = 10_000  # lines kept for the file before a run folder exists
# Ray Train's placement group cleaner asks the State API every second, which without a dashboard always fails.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_NOISE = "Failed to query Ray Train Controller actor state"


def plain(line: str) -> str:
    """The line without terminal colours, and of a progress bar's carriage-return redraws only the last."""
    return ANSI.sub("", line).rstrip("\r").rsplit("\r", 1)[-1]


def shows(line: str, from_project: bool) -> bool:
    """Whether a line written to stdout/stderr reaches the console (quiet mode); every line reaches the file."""
    if from_project:
        return True
    body = RAY_PREFIX.sub("", plain(line), count=1)
    return body.startswith(WORKER_TAGS) or bool(ERROR_LINE.match(body))


def user_facing(record: logging.LogRecord) -> bool:
    """Log records for the console (quiet mode): the project's warnings and anyone's errors."""
    if record.levelno >= logging.ERROR:
        return True
    return record.levelno >= logging.WARNING and record.name.split(".")[0] in PROJECT_MODULES


def _from_project(depth: int) -> bool:
    """Whether the code that called write() (depth frames up) is the project's."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:  # called from C with no Python caller (the interpreter printing at exit)
        return False
    spec = frame.f_globals.get("__spec__")  # `python -m ray_jobs.x` runs as __main__; its spec keeps the real name
    name = (
        spec.name
        if spec is not None and frame.f_globals.get("__name__") == "__main__"
        else frame.f_globals.get("__name__", "")
    )
    return str(name).split(".")[0] in PROJECT_MODULES


class RunLog:
    """The run's log file (lines before it is opened are kept and written first), and the quiet/verbose switch."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.path: Optional[Path] = None
        self._file: Optional[TextIO] = None
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        """One or more complete lines (a trailing newline is added when missing)."""
        if not text.endswith("\n"):
            text += "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(text)
                self._file.flush()  # a crash or a kill must not take the last lines with it
            elif self.path is None and len(self._pending) < PENDING_MAX:
                self._pending.append(text)

    def open(self, path: Path) -> None:
        """Append to `path` from now on (a resumed run keeps its earlier attempts' log), after what came before."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._file is not None:
                self._file.close()
            self.path = path
            self._file = path.open("a", encoding="utf-8", errors="replace")
            self._file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
            self._file.writelines(self._pending)
            self._pending = []
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class ConsoleStream:
    """Stands in for sys.stdout / sys.stderr: every line to the run log, the user-facing ones to the real stream."""

    def __init__(self, real: TextIO, log: RunLog):
        self.real = real
        self.log = log
        self._line = ""
        self._project = False  # some part of the pending line came from project code
        self._lock = threading.RLock()

    def write(self, s: str, from_project: Optional[bool] = None) -> int:
        project = _from_project(1) if from_project is None else from_project
        with self._lock:
            if self.log.verbose:
                self.real.write(s)  # as written, progress bars included
            self._line += s
            self._project = self._project or project
            while "\n" in self._line:
                line, self._line = self._line.split("\n", 1)
                self._emit(line)
                self._project = project and bool(self._line)  # more of this write: the same caller's
        return len(s)

    def _emit(self, line: str) -> None:
        self.log.write(plain(line))
        if not self.log.verbose and shows(line, self._project):
            self.real.write(line + "\n")
            self.real.flush()  # few lines, each worth seeing at once (a pipe would hold them back)
        self._project = False

    def flush(self) -> None:
        with self._lock:
            self.real.flush()

    def close_line(self) -> None:
        """Emit a last line that has no newline (at exit)."""
        with self._lock:
            if self._line:
                line, self._line = self._line, ""
                self._emit(line)

    def isatty(self) -> bool:
        # quiet: libraries that draw progress bars on a terminal write plain lines instead
        return self.log.verbose and self.real.isatty()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, errors, buffer, ...: the real stream's
        return getattr(self.real, name)


class _RunLogHandler(logging.Handler):
    """Every record into the run log."""

    def __init__(self, log: RunLog):
        super().__init__(logging.INFO)
        self.run_log = log
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.write(self.format(record))
        except Exception:
            self.handleError(record)


class _ConsoleHandler(logging.StreamHandler):
    """Records for the user on the real stdout (found at each record: tests swap sys.stdout)."""

    def __init__(self, log: RunLog):
        super().__init__()
        self.run_log = log
        self.setFormatter(logging.Formatter(FORMAT))
        self.addFilter(lambda r: self.run_log.verbose or user_facing(r))

    @property
    def stream(self) -> TextIO:
        out = sys.stdout
        return out.real if isinstance(out, ConsoleStream) else out

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


_log: Optional[RunLog] = None


def setup(verbose: bool = False) -> RunLog:
    """Logging for a step's driver: records to the run log (kept until the file opens) and, if user-facing, to the
    console. Call once at start; attach() then opens the file and takes over stdout/stderr."""
    global _log
    detach()  # a second setup in one process starts over
    root = logging.getLogger()
    _log = RunLog(verbose)
    root.setLevel(logging.INFO)
    root.addHandler(_RunLogHandler(_log))
    root.addHandler(_ConsoleHandler(_log))
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return _log


def attach(path: Path, verbose: bool = False) -> Optional[Path]:
    """Write the run log to `path` and filter stdout/stderr from now on; nothing without setup() (library use)."""
    log = _log
    if log is None:
        return None
    log.verbose = verbose
    if log.path == path:
        return path
    first = log.path is None
    log.open(path)
    if first:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, ConsoleStream):
                setattr(sys, name, ConsoleStream(stream, log))
                _repoint_handlers(stream, getattr(sys, name))
        sys.excepthook = _excepthook
        atexit.register(_close)
    print(f"[run] log: {path}", flush=True)
    return path


def say(*args: Any, file: Optional[TextIO] = None, **kwargs: Any) -> None:
    """print() for a step's user-facing lines (plan, result, errors): they reach the console in quiet mode whatever
    the call stack looks like."""
    stream = file or sys.stdout
    text = io.StringIO()
    kwargs.pop("flush", None)
    print(*args, file=text, **kwargs)
    if isinstance(stream, ConsoleStream):
        stream.write(text.getvalue(), from_project=True)
    else:
        stream.write(text.getvalue())
    stream.flush()


def _repoint_handlers(old: Any, new: Any) -> None:
    """Handlers that libraries imported earlier bound to the real stream (logging.StreamHandler() takes sys.stderr
    when made) write through the console stream instead."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for h in getattr(logger, "handlers", []):
            if isinstance(getattr(type(h), "stream", None), property):
                continue  # finds sys.stderr at each record already
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(new)


def detach() -> None:
    """Give stdout/stderr back and close the file (tests; a process normally keeps its console to the end)."""
    global _log
    _close()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, ConsoleStream):
            setattr(sys, name, stream.real)
            _repoint_handlers(stream, stream.real)
    if sys.excepthook is _excepthook:
        sys.excepthook = sys.__excepthook__
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, (_RunLogHandler, _ConsoleHandler))]:
        root.removeHandler(h)
    _log = None


def _close() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, ConsoleStream):
            stream.close_line()
    if _log is not None:
        _log.close()


def _excepthook(tp, value, tb) -> None:
    """A step that fails shows its traceback on the console (and in the file), with where the full log is."""
    text = "".join(traceback.format_exception(tp, value, tb))
    err = sys.stderr.real if isinstance(sys.stderr, ConsoleStream) else sys.stderr
    if _log is not None:
        _log.write(text)
    err.write(text + (f"full log: {_log.path}\n" if _log is not None and _log.path else ""))
    err.flush()


def quiet_ray_workers() -> None:
    """Ray runtime env setup hook (every worker of the job): drop the placement group cleaner's every-second warning
    that the State API is down (it is, without a dashboard), keep its other messages."""
    logging.getLogger(CLEANER_LOGGER).addFilter(lambda r: not r.getMessage().startswith(CLEANER_NOISE))
