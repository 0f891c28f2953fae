"""The public surface: ``work`` and ``workflow``.

How a call moves through it::

    @workflow body(...)  --> Workflow(name, **options); with wf: body(...)   (the current one)
      f(**kw)            --> WorkFunction.__call__ --> current_workflow()
                               none open: f runs here, unchanged
                               open:      Workflow.submit_task(f, args, kw, resources, env)
                                          --> [AsyncResult]; wf.wait(...); the value
      f.submit / f.map   --> the same, returning the AsyncResult / MapResult at once

Options of ``@work`` (resources, environment, iDDS ``init_env`` and
``container_options``) ride along with each call; those of ``@workflow`` are
the :class:`~idds_fat.workflow.Workflow`'s. Everything else is the workflow's.
"""

from idds_fat.api.decorators import WorkFunction, work, workflow

__all__ = ["WorkFunction", "work", "workflow"]
