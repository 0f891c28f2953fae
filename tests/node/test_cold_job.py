"""A cold job (``wrapper --spec``, node/main.py): what it loads, and how its process ends.

A cold job whose function loaded no module and left no thread ends its process
at once once its result is delivered (``_exit_at_once``), after what an orderly
exit would still do: ``atexit`` callbacks, a collection, the flush of stdout
and stderr. Each job here reports, from an ``atexit`` callback of its own,
which way its process ended, and leaves work only an orderly exit finishes.
"""

from __future__ import annotations

import pytest

from idds_fat import Workflow, work

# What a job without a code context, delivering into a reply file, does not use.
NOT_LOADED = [
    "pathlib",
    "urllib.parse",
    "urllib.request",
    "shutil",
    "getopt",
    "select",
    "tempfile",
    "stomp",
]


@work
def loaded_of(names):
    import sys

    return [name for name in names if name in sys.modules]


@work
def leaves_work_behind(path, extra):
    import atexit
    import sys

    def report_how_the_process_ends():
        frames, frame = [], sys._getframe()
        while frame is not None:
            frames.append(frame.f_code.co_name)
            frame = frame.f_back
        with open(path + ".atexit", "w") as handle:
            handle.write("at once" if "_exit_at_once" in frames else "interpreter")

    atexit.register(report_how_the_process_ends)

    class Holder:
        def __del__(self):
            with open(path + ".cycle", "w") as handle:
                handle.write("finalized")

    holder = Holder()
    holder.me = holder  # a cycle: only a collection runs its finalizer
    print("stdout, block-buffered", end="")
    sys.stderr.write("stderr, written by the job\n")
    if extra == "stdout":  # the original keeps what was printed before
        sys.stdout = open(path + ".stdout", "w")  # noqa: SIM115 - never closed, on purpose
        print("to the replacement")
    elif extra == "module":
        import fractions  # noqa: F401 - a module the wrapper had not loaded
    elif extra == "thread":
        import threading
        import time

        def late_writer():
            time.sleep(0.3)  # outlives the function: the exit has to wait for it
            with open(path + ".thread", "w") as handle:
                handle.write("done")

        threading.Thread(target=late_writer).start()
    return 42


def test_a_cold_job_without_a_code_context_loads_nothing_it_does_not_use():
    with Workflow(max_workers=1, local_mode="cold", progress=False, source_dir=False):
        assert loaded_of(NOT_LOADED) == []


@pytest.mark.parametrize(
    ("extra", "ended"),
    [
        ("nothing", "at once"),
        ("stdout", "at once"),
        ("module", "interpreter"),
        ("thread", "interpreter"),
    ],
)
def test_a_cold_job_ends_at_once_only_when_that_loses_nothing(tmp_path, extra, ended):
    path = str(tmp_path / "job")
    with Workflow(max_workers=1, local_mode="cold", progress=False, source_dir=False) as wf:
        assert leaves_work_behind(path, extra) == 42
        job = wf.work_dir / "jobs" / "t0001" / "0"
    assert (tmp_path / "job.atexit").read_text() == ended
    # Whichever way it ended, nothing it left was lost.
    assert (tmp_path / "job.cycle").read_text() == "finalized"
    assert (job / "stdout.txt").read_text() == "stdout, block-buffered"
    assert "stderr, written by the job\n" in (job / "stderr.txt").read_text()
    if extra == "thread":
        assert (tmp_path / "job.thread").read_text() == "done"
    if extra == "stdout":
        assert (tmp_path / "job.stdout").read_text() == "to the replacement\n"


@pytest.mark.parametrize("argv", [["--spec"], ["--worker=1"], ["--spec=s", "--pack", "1"]])
def test_the_command_line_refuses_a_missing_value_or_a_value_to_a_flag(argv, capsys):
    from idds_fat.node.errors import EXIT_UNREPORTED
    from idds_fat.node.main import main

    assert main(argv) == EXIT_UNREPORTED
    assert capsys.readouterr().err.startswith("usage: wrapper.py --spec LOCATION")


def test_the_command_line_reads_name_equals_value():
    from idds_fat.node.main import _options

    assert _options(["--spec=a=b", "--reply-file", "r"]) == {"--spec": "a=b", "--reply-file": "r"}
    assert _options(["--worker"]) == {"--worker": ""}
