"""The console filter and the run log (ray_jobs/console.py), without Ray: lines and records in, console and file out."""

import io
import logging
import sys

import pytest

from ray_jobs import console

CYAN, RESET = "\x1b[36m", "\x1b[0m"
WORKER = f"{CYAN}(RayTrainWorker pid=8247){RESET} "


@pytest.mark.parametrize(
    "line, shown",
    [
        (WORKER + "[train] rank 0 on node 4bd7c15f pid 8247", True),
        (WORKER + "[train] step 10/140, loss 2.31, elapsed 41s, left ~532s", True),
        (f"{CYAN}(RayTrainWorker pid=8247, ip=10.0.0.2){RESET} [train] resuming from /tmp/ckpt", True),
        (f"{CYAN}(MapWorker(MapBatches(Tokenize)) pid=9228){RESET} [plan] 2 workers", True),
        (
            f"{CYAN}(PlacementGroupCleaner pid=8145){RESET} "
            "Failed to query Ray Train Controller actor state. State API "
            "may be temporarily unavailable. Continuing to monitor.",
            False,
        ),
        (WORKER + "{'loss': 2.31, 'grad_norm': 0.8, 'learning_rate': 0.001, 'epoch': 0.1}", False),
        (WORKER + "[transformers] LlamaForSequenceClassification LOAD REPORT", False),
        (f"{CYAN}(raylet){RESET} [train] a tag after Ray's own prefix", True),
        ("2026-12-02 19:45:50,377\tINFO logging_progress.py:225 -- Total Progress: 0/?", False),
        ("2026-12-02 19:45:39,831\tWARNING util.py:650 -- The argument ``concurrency`` is deprecated", False),
        ("2026-12-02 19:45:39,831\tERROR streaming_executor.py:300 -- Operator failed", True),
        ("Loading weights: 100%|##########| 272/272", False),
        ("[train] a tag that no worker prefix carries", True),
    ],
)
def test_which_lines_reach_the_console(line, shown):
    assert console.shows(line, from_project=False) is shown


def test_what_the_project_prints_is_shown_whatever_it_says():
    assert console.shows("macro_f1=0.8123 weighted_f1=0.8 accuracy=0.81 n=600", from_project=True)
    assert not console.shows("macro_f1=0.8123 weighted_f1=0.8 accuracy=0.81 n=600", from_project=False)


def _streams(tmp_path, verbose=False):
    log = console.RunLog(verbose)
    real = io.StringIO()
    return log, real, console.ConsoleStream(real, log)


def test_every_line_goes_to_the_file_and_only_user_facing_ones_to_the_console(tmp_path):
    log, real, out = _streams(tmp_path)
    out.write("before the file opens, from a library\n", from_project=False)  # kept for the file
    log.open(tmp_path / "logs" / "pipeline.log")
    out.write(WORKER + "[train] start: world_size 1, 2 threads, step 0/140, 16 examples per step\n")
    out.write(f"{CYAN}(PlacementGroupCleaner pid=8145){RESET} Failed to query Ray Train Controller actor state.\n")
    out.write("2026-12-02 19:45:50,377\tINFO logging_progress.py:225 -- Total Progress: 0/?\n", from_project=False)
    out.write("Loading weights:  14%|#3  | 37/272\rLoading weights: 100%|##########| 272/272\n", from_project=False)
    out.write("run tiny: ", from_project=True)  # print() writes its text and the newline apart
    out.write("runs/tiny", from_project=False)
    out.write("\n", from_project=True)
    log.close()
    shown = real.getvalue().splitlines()
    assert shown == [
        WORKER + "[train] start: world_size 1, 2 threads, step 0/140, 16 examples per step",
        "run tiny: runs/tiny",
    ]
    text = (tmp_path / "logs" / "pipeline.log").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("==== ")  # a header per attempt: a resumed run appends
    assert lines[1:] == [
        "before the file opens, from a library",
        "(RayTrainWorker pid=8247) [train] start: world_size 1, 2 threads, step 0/140, 16 examples per step",
        "(PlacementGroupCleaner pid=8145) Failed to query Ray Train Controller actor state.",
        "2026-12-02 19:45:50,377\tINFO logging_progress.py:225 -- Total Progress: 0/?",
        "Loading weights: 100%|##########| 272/272",  # a progress bar's last state, no colours
        "run tiny: runs/tiny",
    ]


def test_verbose_shows_everything_as_written(tmp_path):
    log, real, out = _streams(tmp_path, verbose=True)
    log.open(tmp_path / "x.log")
    progress = "2026-12-02 19:45:50,377\tINFO logging_progress.py:225 -- Total Progress: 0/?\n"
    out.write("bar 10%\rbar 100%\n", from_project=False)
    out.write(progress, from_project=False)
    assert real.getvalue() == "bar 10%\rbar 100%\n" + progress
    assert "bar 100%\n" in (tmp_path / "x.log").read_text()


def test_print_from_a_project_module_is_told_from_a_library_print(tmp_path):
    log, real, out = _streams(tmp_path)
    log.open(tmp_path / "x.log")
    code = compile("def say(stream, text):\n    print(text, file=stream)\n", "<fake>", "exec")
    project, library = {"__name__": "textclf.fake"}, {"__name__": "transformers.fake"}
    exec(code, project)
    exec(code, library)
    project["say"](out, "[plan] shown")
    library["say"](out, "hidden")
    assert real.getvalue() == "[plan] shown\n"
    assert (tmp_path / "x.log").read_text().splitlines()[1:] == ["[plan] shown", "hidden"]


def test_a_last_line_without_newline_reaches_the_file_at_exit(tmp_path):
    log, real, out = _streams(tmp_path)
    log.open(tmp_path / "x.log")
    out.write("no newline", from_project=False)
    out.close_line()
    assert (tmp_path / "x.log").read_text().splitlines()[-1] == "no newline"


@pytest.mark.parametrize(
    "name, level, shown",
    [
        ("ray_jobs.evaluate", logging.WARNING, True),
        ("textclf.storage", logging.WARNING, True),
        ("ray_jobs", logging.INFO, False),
        ("ray.data", logging.WARNING, False),
        ("transformers.trainer", logging.ERROR, True),
        ("mlflow.tracking", logging.INFO, False),
    ],
)
def test_which_log_records_reach_the_console(name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "msg", None, None)
    assert console.user_facing(record) is shown


def test_setup_attach_detach_in_one_process(tmp_path, capsys):
    log = console.setup()
    try:
        logging.getLogger("ray_jobs.x").info("an info record, kept for the file")
        logging.getLogger("ray_jobs.x").warning("a warning for the user")
        path = console.attach(tmp_path / "logs" / "step.log")
        assert isinstance(sys.stdout, console.ConsoleStream) and log.path == path
        print("from a test module: not the project's, so hidden")
        logging.getLogger("a_library").info("a library record")  # not ray.data: Ray configures it once imported
    finally:
        console.detach()
    out = capsys.readouterr().out
    assert "a warning for the user" in out and f"[run] log: {path}" in out
    assert "an info record" not in out and "hidden" not in out and "a library record" not in out
    text = path.read_text()
    for kept in ("an info record, kept for the file", "a warning for the user", "hidden", "a library record"):
        assert kept in text
    assert not isinstance(sys.stdout, console.ConsoleStream)


def test_attach_does_nothing_without_setup(tmp_path):
    console.detach()
    assert console.attach(tmp_path / "logs" / "x.log") is None and not (tmp_path / "logs").exists()


def test_the_worker_hook_drops_only_the_cleaner_state_api_warning():
    logger = logging.getLogger(console.CLEANER_LOGGER)
    before = list(logger.filters)
    try:
        console.quiet_ray_workers()

        def make(msg):
            return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, None, None)

        assert not logger.filter(make("Failed to query Ray Train Controller actor state. State API may be ..."))
        assert logger.filter(make("Detected that the Ray Train controller actor (x) is dead."))
    finally:
        logger.filters[:] = before


def test_a_library_handler_made_before_attach_writes_through_the_console_stream(tmp_path, capsys):
    early = logging.getLogger("some_library")
    handler = logging.StreamHandler(sys.stderr)  # as libraries do when imported
    early.addHandler(handler)
    early.propagate = False
    try:
        console.setup()
        path = console.attach(tmp_path / "x.log")
        early.warning("a library's own handler")
    finally:
        console.detach()
        early.removeHandler(handler)
    assert "a library's own handler" not in capsys.readouterr().err
    assert "a library's own handler" in path.read_text()


def test_a_step_run_with_python_m_counts_as_the_project(tmp_path):
    """`python -m ray_jobs.pipeline` runs the step's module as __main__: its result lines must reach the console."""
    import importlib.util
    import io

    log = console.RunLog()
    log.open(tmp_path / "step.log")
    real = io.StringIO()
    stream = console.ConsoleStream(real, log)
    for name, shown in (("ray_jobs.pipeline", True), ("json", False)):
        code = {"__name__": "__main__", "__spec__": importlib.util.find_spec(name), "stream": stream}
        exec(f"stream.write('result from {name}\\n')", code)
        assert (f"result from {name}" in real.getvalue()) is shown


def test_say_reaches_the_console_from_anywhere(tmp_path):
    import io

    log = console.RunLog()
    log.open(tmp_path / "step.log")
    real = io.StringIO()
    stream = console.ConsoleStream(real, log)
    code = {"__name__": "some.library", "console": console, "stream": stream}
    exec("console.say('\\nrun x: /runs/x', file=stream)\nstream.write('library chatter\\n')", code)
    assert real.getvalue() == "\nrun x: /runs/x\n"
    assert (tmp_path / "step.log").read_text().splitlines()[-2:] == ["run x: /runs/x", "library chatter"]
