"""The driver process: run a workflow's body away from its caller (``workflow.driver``).

    python -m idds_fat.workflow.driver_main --work-dir WORK_DIR [--lock-fd N] WORKFLOW_ID

Started by :func:`idds_fat.workflow.driver.launch` (a new session, or a Slurm
job), never by hand. It verifies the sealed body with the workflow's key,
attaches to the workflow (its own embedded service, or the configured one;
its own backend), runs the body with the workflow current, closes it, and
seals the body's value or exception into ``driver/outcome.bin``. Its log is
its stderr (``driver/stderr.txt``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow import driver
from idds_fat.workflow.runtime import Workflow
from idds_fat.workflow.state import WorkflowState

logger = logging.getLogger("idds_fat.workflow.driver")


def main(argv: list[str] | None = None) -> int:
    """Run the body of the workflow named on the command line; return the exit status
    (0: the body returned, 1: it raised or the workflow could not be reopened; the
    outcome file says which)."""
    parser = argparse.ArgumentParser(prog="python -m " + driver.DRIVER_MODULE)
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--lock-fd", type=int, default=None)
    parser.add_argument("workflow_id")
    options = parser.parse_args(argv)
    if options.lock_fd is not None:
        # Held until this process ends; children it starts need not hold it.
        os.set_inheritable(options.lock_fd, False)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    workflow_dir = WorkDirPaths(options.work_dir).workflow(options.workflow_id).root
    try:
        body, config = driver.read_body(workflow_dir)  # also: the caller's cwd and sys.path
        secrets = driver.read_secrets(workflow_dir)
        driver.mark_driving(options.workflow_id)
        wf = Workflow.attach(
            options.workflow_id, work_dir=options.work_dir, force=True, base=config, **secrets
        )
    except BaseException as exc:
        logger.exception("the driver of %s could not start", options.workflow_id)
        driver.write_outcome(workflow_dir, False, exc, traceback.format_exc())
        return 1
    logger.info("driving workflow %s (service %s)", wf.id, wf.service_url)
    try:
        with wf:
            value = body()
    except BaseException as exc:
        logger.info("the body of %s raised %s", wf.id, type(exc).__name__)
        driver.write_outcome(workflow_dir, False, exc, traceback.format_exc())
        state = WorkflowState(WorkDirPaths(options.work_dir).workflow(wf.id).state)
        try:
            state.set_workflow_status("failed")  # the body failed; its jobs were cancelled
        finally:
            state.close()
        return 1
    driver.write_outcome(workflow_dir, True, value)
    logger.info("the body of %s returned", wf.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
