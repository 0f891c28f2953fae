"""The PanDA server's adder step, run again and again, for a test PanDA server.

In production the server's daemon manager runs ``add_main`` on a schedule; it
takes the job reports pilots sent and closes their jobs (and lets JEDI finish
their tasks). ``add_main`` returns after its own loops; this runs it again until
killed. Arguments: the grace period (seconds a report waits) and threads.
"""

import sys

from pandaserver.daemons.scripts import add_main


def main() -> None:
    """Run ``add_main`` forever with this command's arguments."""
    grace, threads = (sys.argv[1:] + ["0", "1"])[:2]
    while True:
        add_main.main(argv=["add_main", grace, threads])


if __name__ == "__main__":
    main()
