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

import getopt
import os
import sys
from pathlib import Path

from .deliver import deliver, reply_in_file
from .environments import enter_environment, exec_with_secrets_on_a_pipe
from .errors import EXIT_UNDELIVERED, EXIT_UNREPORTED, DeliveryError, WrapperError
from .fetch import load_spec
from .pilot import run_pilot
from .run import run_job
from .spec import SECRETS_ENV, read_secrets
from .worker import read_pack, run_pack, serve_worker


def run_one(location: str, secrets: dict, workdir: Path, reply_file: str | None = None) -> int:
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
        for leftover in workdir.glob("context-*"):
            import shutil

            shutil.rmtree(leftover, ignore_errors=True)
    return 0


USAGE = """usage: wrapper.py --spec LOCATION [--reply-file PATH]
       wrapper.py --jobs-file FILE --pack N
       wrapper.py --worker
       wrapper.py --pilot URL --pool NAME --dir DIR [--idle SECONDS] [--walltime SECONDS]"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Options are read with ``getopt``, which costs a job far less to import
    than ``argparse`` (~5 ms, a tenth of a cold job's own time).
    """
    try:
        pairs, rest = getopt.getopt(
            sys.argv[1:] if argv is None else argv,
            "",
            ["spec=", "reply-file=", "worker", "jobs-file=", "pack="]
            + ["pilot=", "pool=", "dir=", "idle=", "walltime="],
        )
        options = dict(pairs)
        modes = [m for m in ("--spec", "--worker", "--jobs-file", "--pilot") if m in options]
        if rest or len(modes) != 1 or (("--jobs-file" in options) != ("--pack" in options)):
            raise getopt.GetoptError(
                "give one of --spec, --worker, --jobs-file (with --pack), --pilot"
            )
        if "--pilot" in options and not ("--pool" in options and "--dir" in options):
            raise getopt.GetoptError("--pilot needs --pool and --dir")
    except getopt.GetoptError as exc:
        print(f"{USAGE}\nidds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    try:
        # Called with argv (in a test's process), there is no command line to run again.
        given_in_environment = SECRETS_ENV in os.environ and argv is None
        secrets = read_secrets()
        if given_in_environment:
            exec_with_secrets_on_a_pipe(secrets)
        jobs = (
            read_pack(options["--jobs-file"], options["--pack"]) if modes == ["--jobs-file"] else []
        )
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    if "--worker" in options:
        return serve_worker(secrets)
    if "--jobs-file" in options:
        return run_pack(jobs, secrets)
    if "--pilot" in options:
        walltime = options.get("--walltime")
        return run_pilot(
            secrets,
            options["--pilot"],
            options["--pool"],
            Path(options["--dir"]),
            float(options.get("--idle", "60")),
            float(walltime) if walltime else None,
        )
    return run_one(options["--spec"], secrets, Path.cwd(), options.get("--reply-file"))


if __name__ == "__main__":
    sys.exit(main())
