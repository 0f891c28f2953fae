"""The wrapper's command line: one job, a pack of jobs, or a warm worker.

Usage::

    python3 wrapper.py --spec LOCATION [--reply-file PATH]   # one job (cold)
    python3 wrapper.py --jobs-file FILE --pack N             # a pack of jobs, one interpreter
    python3 wrapper.py --worker                              # warm: jobs sent on stdin
    python3 wrapper.py --pilot URL --pool NAME --dir DIR [--idle S] [--walltime S]
                                                             # warm workers leasing jobs

``LOCATION`` is a path or URL of the job spec, named by its sha256 (checked).
Secrets never travel on the command line nor sit in a job process's
environment block: the workflow's HMAC key and the service token (a JSON
object) come on the inherited pipe whose descriptor ``IDDS_FAT_JOB_SECRETS_FD``
names, or in the 0600 file ``IDDS_FAT_JOB_SECRETS_FILE`` names. A wrapper
given ``IDDS_FAT_JOB_SECRETS`` (the JSON itself) runs itself again at once,
without it, the secrets on a pipe, so the user's function never runs in a
process started with them (``/proc/self/environ`` shows a process's first
environment, whatever it removes later).

Exit status: 0 when the result (a value or the function's exception) was
delivered; 3 when it could not be delivered within the spec's publish timeout;
2 when the job could not even report its failure. A result is never silently
lost: a non-zero exit tells the backend the job ended without one.
"""

from __future__ import annotations

import os
import sys

from .deliver import deliver, reply_in_file
from .environments import enter_environment, exec_with_secrets_on_a_pipe
from .errors import EXIT_UNDELIVERED, EXIT_UNREPORTED, DeliveryError, WrapperError
from .fetch import load_spec
from .pilot import run_pilot
from .run import job_pickler, run_job
from .spec import SECRETS_ENV, read_secrets
from .worker import read_pack, run_pack, serve_worker


def run_one(location: str, secrets: dict, workdir: str, reply_file: str | None = None) -> int:
    """Run the job whose spec is at ``location`` in ``workdir``; return its exit status.

    With ``reply_file``, the result is left in that file for the caller that
    started this process (while it lives) instead of being delivered.
    """
    try:
        spec = load_spec(location, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    failure = None
    try:
        status = enter_environment(spec, secrets, location, workdir)
    except Exception as exc:  # reported as the job's setup error: the caller learns why
        status, failure = None, exc
    if status is not None:  # the job ran in a container, which delivered its result
        return status
    envelope = run_job(spec, secrets, workdir, setup_failure=failure)
    try:
        if reply_file:
            try:
                if reply_in_file(envelope, spec, secrets, reply_file):
                    return 0
            except (WrapperError, OSError) as exc:
                print(f"idds-fat wrapper: no reply file ({exc}); delivering", file=sys.stderr)
        deliver(envelope, spec, secrets)
    except DeliveryError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED
    finally:
        try:
            names = os.listdir(workdir)
        except OSError:  # the work dir is gone: nothing left to remove
            names = []
        for name in names:
            if name.startswith("context-"):
                import shutil

                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    return 0


USAGE = """usage: wrapper.py --spec LOCATION [--reply-file PATH]
       wrapper.py --jobs-file FILE --pack N
       wrapper.py --worker
       wrapper.py --pilot URL --pool NAME --dir DIR [--idle SECONDS] [--walltime SECONDS]"""

_FLAGS = ("--worker",)
_VALUED = ("--spec", "--reply-file", "--jobs-file", "--pack")
_VALUED += ("--pilot", "--pool", "--dir", "--idle", "--walltime")


def _options(argv: list[str]) -> dict[str, str]:
    """Read ``--name VALUE``, ``--name=VALUE`` and ``--worker`` (exact names, no arguments).

    Raises ValueError on anything else. Not ``getopt`` or ``argparse``: a cold job
    imports neither (``getopt`` and its ``gettext``: 1.9 ms of a 119 ms job under
    load; ``argparse`` more).
    """
    options: dict[str, str] = {}
    given = iter(argv)
    for arg in given:
        name, equals, value = arg.partition("=")
        if name in _FLAGS and not equals:
            options[name] = ""
        elif name in _VALUED:
            if not equals:
                value = next(given, None)
                if value is None:
                    raise ValueError(f"option {name} requires an argument")
            options[name] = value
        else:
            raise ValueError(f"option {arg} not recognized")
    modes = [m for m in ("--spec", "--worker", "--jobs-file", "--pilot") if m in options]
    if len(modes) != 1 or (("--jobs-file" in options) != ("--pack" in options)):
        raise ValueError("give one of --spec, --worker, --jobs-file (with --pack), --pilot")
    if "--pilot" in options and not ("--pool" in options and "--dir" in options):
        raise ValueError("--pilot needs --pool and --dir")
    return options


def _exit_at_once(loaded: set[str]) -> None:
    """End this process now with status 0 if that loses nothing; else return.

    An interpreter's teardown (module dicts cleared, a last collection) is a
    sixth of a cold job's floor: ``python -c "import cloudpickle"`` spends ~11
    of its ~70 ms there. It is skipped only when the job left nothing that
    teardown would finish: it loaded no module beyond ``loaded`` (a module's
    objects, its open files, an extension's C buffers die with it) and runs no
    other thread (an exit joins them). What ``Py_Finalize`` does first is done
    here: the ``atexit`` callbacks (logging's flush, coverage's save; they run
    once), a collection of what the job left in cycles (their finalizers), and
    the flush of ``sys.stdout`` and ``sys.stderr`` (and of the originals, if
    the job replaced them); a stream that cannot be flushed is left to the
    interpreter to report. The caller has the result before this is called
    (``run_one`` returned 0).
    """
    if set(sys.modules) - loaded:
        return
    import atexit
    import gc

    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    run_exit_callbacks = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_callbacks is None:  # not CPython: let the interpreter end as it does
        return
    run_exit_callbacks()
    gc.collect()
    try:
        # The originals too: a job that replaced sys.stdout may have printed before.
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: let the interpreter report it
        return
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Run as a process (``argv`` None), a cold job that delivered its result may
    end its process at once instead of returning (``_exit_at_once``).
    """
    try:
        options = _options(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{USAGE}\nidds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    try:
        # Called with argv (in a test's process), there is no command line to run again.
        given_in_environment = SECRETS_ENV in os.environ and argv is None
        secrets = read_secrets()
        if given_in_environment:
            exec_with_secrets_on_a_pipe(secrets)
        jobs = []
        if "--jobs-file" in options:
            jobs = read_pack(options["--jobs-file"], options["--pack"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    if "--worker" in options:
        return serve_worker(secrets)
    if "--jobs-file" in options:
        return run_pack(jobs, secrets)
    if "--pilot" in options:
        from pathlib import Path  # not at the top: a cold job never loads pathlib (~3 ms)

        walltime = options.get("--walltime")
        return run_pilot(
            secrets,
            options["--pilot"],
            options["--pool"],
            Path(options["--dir"]),
            float(options.get("--idle", "60")),
            float(walltime) if walltime else None,
        )
    if argv is not None:  # in a test's process: nothing to end early
        return run_one(options["--spec"], secrets, os.getcwd(), options.get("--reply-file"))
    import gc

    job_pickler()  # loaded before the snapshot: what loads after it, the job loaded
    loaded = set(sys.modules)
    # The objects that exist now are the wrapper's and its modules': frozen, the
    # collection before an exit at once sees only the job's (~3 ms less a job).
    gc.freeze()
    status = run_one(options["--spec"], secrets, os.getcwd(), options.get("--reply-file"))
    if status == 0:
        _exit_at_once(loaded)
    gc.unfreeze()  # the interpreter's own teardown then sees every object, as usual
    return status


if __name__ == "__main__":
    sys.exit(main())
