"""JEDI's master process in the foreground, for a test PanDA server.

Upstream's ``JediMaster.py`` enters a ``python-daemon`` context, which forks away
from its parent; a test harness must keep the process it started (and stop its
process group). This runs the same master without that context. Configured, like
upstream, by ``$PANDA_HOME/etc/panda/panda_jedi.cfg``; ``PANDA_NO_ROOT`` keeps the
current user.

Usage: ``python jedi_master.py [CYCLE [RESCUE]]``. The two changes to upstream's
behaviour, both timings no setting reaches:

- With CYCLE (seconds): JEDI 1.0.4's post-processor (which turns a task whose jobs
  ended into ``done``/``finished``/``failed``, and ``toabort`` into ``aborted``)
  sleeps out a fixed 60 s cycle; its sleeps are capped at CYCLE, like the other
  agents' loopCycle.
- With RESCUE (seconds): a killed task whose jobs were still running stays
  ``aborting`` until the task commando's orphan rescue takes it up again, 5 minutes
  (hard-coded in ``getTasksToExecCommand_JEDI``) after its last change; only then
  does JEDI see that its jobs have ended and move it to ``toabort``. RESCUE
  replaces those 5 minutes.
"""

import datetime
import inspect
import signal
import sys
import time

from pandajedi.jediorder import PostProcessor
from pandajedi.jediorder.JediMaster import JediMaster, kill_whole
from pandaserver.taskbuffer.db_proxy_mods import task_complex_module


class _CappedSleep:
    """The ``time`` module as the post-processor sees it, with sleeps capped."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


class _RescueWindow:
    """The ``datetime`` module as ``task_complex_module`` sees it, with its one
    ``timedelta(minutes=5)`` (the orphan rescue's window) replaced."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def timedelta(self, *args, **kwargs) -> datetime.timedelta:
        if not args and kwargs == {"minutes": 5}:
            return datetime.timedelta(seconds=self._seconds)
        return datetime.timedelta(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(datetime, name)


def _shorten_rescue(seconds: float) -> None:
    module = inspect.getsource(task_complex_module)
    method = inspect.getsource(task_complex_module.TaskComplexModule.getTasksToExecCommand_JEDI)
    # Only while the window is the module's one 5-minute timedelta, as in 1.0.4.
    if module.count("timedelta(minutes=5)") != 1 or "timedelta(minutes=5)" not in method:
        print("JediMaster: WARNING orphan rescue changed upstream: left at 5 min", flush=True)
        return
    task_complex_module.datetime = _RescueWindow(seconds)


def main() -> None:
    """Start the master's agents and wait for them; a signal ends the whole group."""
    print("JediMaster: INFO    start (foreground)", flush=True)
    # Patched here, before the agents and the DB proxies fork: they inherit it.
    if len(sys.argv) > 1:
        PostProcessor.time = _CappedSleep(float(sys.argv[1]))
    if len(sys.argv) > 2:
        _shorten_rescue(float(sys.argv[2]))
    master = JediMaster()

    def stop(sig, frame):
        master.stop()
        kill_whole(sig, frame)

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, stop)
    master.start()


if __name__ == "__main__":
    sys.exit(main())
