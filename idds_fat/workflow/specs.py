"""A workflow's job specs: built in one function, stored in the cache, read back by their key.

A job spec is the JSON document a job's wrapper starts from (``--spec``): where
the call, its arguments and the code context are in the cache, where to deliver
the result, which environment to run in (docs/contracts.md). Its cache key
travels on the job's :class:`JobRequest` (``spec_key``), so whoever runs a job
again, or attaches to it, reads the spec back by that key.

::

    build(job 0 of a task)    job_spec -> JobSpec.to_json      the one place a spec is built
                              kept as the task's _FirstJob
    build(job 1)              _TaskTemplate: job_spec's JSON with job, name and kwargs
                              cut out, checked against job 0's bytes (else: as job 0)
    build(jobs 1, 2, ...)     the template with the job's values spliced in: the same
                              bytes (its sha256 is the key the wrapper checks), for the
                              price of a few string joins; a map's caller builds one per job
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import dataclasses
import json
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from idds_fat.backends import BACKENDS, InlineSpec, JobRequest, Resources
from idds_fat.cache import ContentStore, content_key
from idds_fat.context.environment import (
    EnvironmentSettings,
    caller_versions,
    environment_spec,
    task_environment,
)
from idds_fat.node.fetch import cache_object_location
from idds_fat.node.spec import JobSpec
from idds_fat.serialize import loads, open_envelope, seal
from idds_fat.workdir import WorkflowPaths

if TYPE_CHECKING:
    from idds_fat.serialize.pickling import PickledCall
    from idds_fat.workflow.options import WorkflowOptions
    from idds_fat.workflow.parts import WorkflowParts

#: Pickled job arguments up to this size travel inside the job spec, larger ones by key.
INLINE_KWARGS_BYTES = 32 * 1024


def presigns(cache: ContentStore) -> bool:
    """Return whether ``cache`` hands out presigned URLs (S3): nodes then need no credentials."""
    return hasattr(cache, "presigned_get")


def node_location(cache: ContentStore, key: str) -> str:
    """Return where a job reads cache object ``key``: a presigned URL on S3, else the cache path."""
    if presigns(cache):
        return cache.presigned_get(key)  # type: ignore[attr-defined]
    return cache_object_location(cache.location, key)


def job_name(task_name: str, index: int) -> str:
    """Return the readable name of job ``index`` of a task (``fn[3]``)."""
    return f"{task_name}[{index}]"


def request_name(workflow_id: str, task_id: str, name: str) -> str:
    """Return the name of the request (and the future) of the job named ``name``
    (``job_name``) of a task: ``workflow/task/fn[3]``."""
    return f"{workflow_id}/{task_id}/{name}"


class JobSpecs:
    """Builds, stores and reads back one workflow's job specs, and the requests that carry them.

    It reads the running workflow's identity, cache and service from ``parts``,
    so it is used once the workflow has started.
    """

    def __init__(self, options: WorkflowOptions, parts: WorkflowParts) -> None:
        self._options = options
        self._parts = parts
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_lock = threading.Lock()
        # The tasks being built, by (task_id, task_name, payload_key, init_env): a
        # _FirstJob until a second job comes, then their _TaskTemplate (or None).
        self._templates: dict[tuple, _FirstJob | _TaskTemplate | None] = {}
        self._templates_lock = threading.Lock()

    @property
    def _cache(self) -> ContentStore:
        assert self._parts.cache is not None, "the workflow has not started"
        return self._parts.cache

    def environment(
        self, environment: Any = None, container_options: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Return the environment spec of a task's jobs: ``environment`` (default the
        workflow's) with the iDDS ``container_options`` of the task or the workflow,
        its archive (a packed environment) stored in the cache.

        Raises:
            ConfigError: a malformed environment.
            ContextError: an environment archive cannot be read or packed.
        """
        options = self._options
        config = options.config
        return environment_spec(
            task_environment(
                environment,
                container_options,
                options.environment,
                options.placement.get("container_options"),
                "container_options" in BACKENDS[config.backend].supported_parameters,
            ),
            self._cache,
            EnvironmentSettings(
                config.env_cache_dir, config.container_runtime, config.container_run_options
            ),
        )

    def store_task(
        self,
        task_id: str,
        task_name: str,
        call: PickledCall,
        job_kwargs: Sequence[bytes | None],
        environment: dict[str, Any],
        init_env: str | None,
        resources: Resources,
    ) -> list[JobRequest]:
        """Store a task's call and one spec per entry of ``job_kwargs`` (pickled
        arguments, or None); return the jobs' requests in the same order.

        Raises:
            CacheError: the cache refused an object.
        """
        payload_key = self.store_call(task_id, call)
        requests = [
            self.build(
                task_id, index, task_name, payload_key, body, environment, init_env, resources
            )
            for index, body in enumerate(job_kwargs)
        ]
        self.write(requests)
        return requests

    def store_call(self, task_id: str, call: PickledCall) -> str:
        """Seal a task's pickled call and put it in the cache; return its key (the
        specs' ``payload``).

        Raises:
            CacheError: the cache refused it.
        """
        parts = self._parts
        payload = seal(
            {
                "kind": "call",
                "workflow": parts.workflow_id,
                "task": task_id,
                **caller_versions(),
                "sources": call.sources,
            },
            call.body,
            parts.key,
        )
        return self._cache.put(payload)

    def build(
        self,
        task_id: str,
        index: int,
        task_name: str,
        payload_key: str,
        body: bytes | None,
        environment: dict[str, Any],
        init_env: str | None,
        resources: Resources,
    ) -> JobRequest:
        """Return the request of job ``index`` of a task (pickled arguments ``body``, or
        None), its spec built and keyed in memory, not yet stored: :meth:`write`
        stores it. Arguments too large to travel in the spec go to the cache now.

        Raises:
            CacheError: the cache refused the job's arguments.
        """
        task = (task_id, task_name, payload_key, init_env)
        template = self._template(task, environment, index)
        if template is None:
            kwargs = self._kwargs_entry(task_id, index, body)
            spec = self.job_spec(
                task_id, index, task_name, payload_key, kwargs, environment, init_env
            )
            data = self._sealed(spec)
            text = data.decode("ascii")
            if index >= 0 and type(index) is int and not presigns(self._cache):
                self._first_job(task, environment, index, kwargs, text)
        else:
            kwargs = self._kwargs_entry(task_id, index, body)
            text = template.render(index, kwargs)
            data = text.encode("ascii")
        return self.request(
            task_id, index, job_name(task_name, index), content_key(data), resources, text
        )

    def _template(
        self, task: tuple, environment: dict[str, Any], index: int
    ) -> _TaskTemplate | None:
        """The template of ``task``'s specs, made when its second job is built (a task
        of one job costs nothing more); None: build this job's spec the slow way."""
        if type(index) is not int or index < 0:
            return None
        with self._templates_lock:
            entry = self._templates.get(task)
        if entry is None:
            return None
        # An environment is a dict, so no key: a task's jobs get the same one (the
        # same object) and the template holds while it is unchanged (a copy's ==).
        same = environment is entry.source and environment == entry.environment
        if isinstance(entry, _TaskTemplate):
            return entry if same else None
        template = self._make_template(task, entry) if same else None
        # A task whose template does not apply keeps None: its jobs take the slow way.
        with self._templates_lock:
            self._templates[task] = template
        return template

    def _first_job(
        self,
        task: tuple,
        environment: dict[str, Any],
        index: int,
        kwargs: dict[str, str] | None,
        text: str,
    ) -> None:
        """Keep what the first job of ``task`` built the slow way: its template is
        checked against it."""
        with self._templates_lock:
            if task in self._templates:
                return  # a task whose template does not apply, or not the first job
        first = _FirstJob(environment, copy.deepcopy(environment), index, kwargs, text)
        with self._templates_lock:
            # Tasks are built one after the other (a dependent task now and then
            # among them): a few entries are enough, the oldest go.
            while len(self._templates) >= _TEMPLATES_KEPT:
                del self._templates[next(iter(self._templates))]
            self._templates[task] = first

    def _make_template(self, task: tuple, first: _FirstJob) -> _TaskTemplate | None:
        """Return the template of ``task``'s specs, or None where a job's spec holds
        more of its own than ``job``, ``name`` and ``kwargs`` (presigned URLs on S3,
        the backend's URLs) or the template does not give ``first``'s spec byte for
        byte."""
        task_id, task_name, payload_key, init_env = task
        if presigns(self._cache):
            return None
        spec = self.job_spec(task_id, 0, task_name, payload_key, None, first.environment, init_env)
        spec.job, spec.name, spec.kwargs = _MARKS  # type: ignore[assignment]
        text = self._sealed(spec).decode("ascii")
        if spec.urls or spec.result_object or spec.result_put_url:
            return None
        marked = sorted((text.find(mark), slot) for slot, mark in enumerate(_MARKS_JSON))
        if any(text.count(mark) != 1 for mark in _MARKS_JSON):
            return None  # a marker's text in a task's own values: never splice there
        pieces, start = [], 0
        for position, slot in marked:
            pieces.append(text[start:position])
            start = position + len(_MARKS_JSON[slot])
        pieces.append(text[start:])
        template = _TaskTemplate(
            first.source,
            first.environment,
            tuple(pieces),
            tuple(slot for _, slot in marked),
            json.dumps(task_name)[:-1],
        )
        # The one check that the splice gives what the slow path gives (else every job
        # of the task takes the slow path).
        if template.render(first.index, first.kwargs) != first.text:
            return None
        return template

    def write(self, requests: Sequence[JobRequest]) -> None:
        """Put the specs that ``requests`` (from :meth:`build`) carry into the cache, in
        one batch: from now on a job, a resubmission or ``attach`` can read them there.
        Then the requests drop their copy (a job not started yet reads its spec from
        the cache), so a long map does not keep every spec in memory.

        Raises:
            CacheError: the cache refused a spec.
        """
        held = [r.inline_spec for r in requests if r.inline_spec is not None]
        self._cache.put_many([h.text.encode("ascii") for h in held if h.text is not None])
        for inline in held:
            inline.text = None

    def write_soon(self, requests: Sequence[JobRequest]) -> concurrent.futures.Future:
        """:meth:`write` in this workflow's spec writer thread; return its future (its
        ``result()`` raises what ``write`` raised)."""
        with self._writer_lock:
            if self._writer is None:
                # One thread: batches are stored in order, and a workflow's specs
                # never wait for another workflow's.
                self._writer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="idds-fat-specs"
                )
            return self._writer.submit(self.write, requests)

    def close(self) -> None:
        """Stop the spec writer thread, if one was started (nothing is pending: every
        submission waits for its batches)."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def job_spec(
        self,
        task_id: str,
        index: int,
        task_name: str,
        payload_key: str,
        kwargs: dict[str, str] | None,
        environment: dict[str, Any],
        init_env: str | None,
    ) -> JobSpec:
        """Return the spec of job ``index`` of a task, attempt 0: the one place a job spec is built.

        ``kwargs`` says where its pickled arguments are (``{"inline": base64}``
        or ``{"key": cache key}``; None: it has none of its own); ``environment``
        is the task's environment spec; ``init_env`` (default: the workflow's)
        a shell line the wrapper runs first.
        """
        parts, config = self._parts, self._options.config
        archive = parts.archive
        return JobSpec(
            workflow=parts.workflow_id,
            task=task_id,
            job=index,
            attempt=0,
            name=job_name(task_name, index),
            cache=self._cache.location,
            archive=None
            if archive is None
            else {"key": archive.sha256, "max_bytes": config.max_context_bytes},
            payload={"key": payload_key},
            kwargs=kwargs,
            result_url=f"{parts.service_url}/results/{parts.workflow_id}",
            stomp=self._options.stomp_spec(parts.workflow_id),
            result_inline_bytes=config.result_inline_bytes,
            publish_timeout=config.publish_timeout,
            environment=environment,
            init_env=init_env or self._options.placement.get("init_env"),
        )

    @staticmethod
    def rows(task_name: str, requests: Sequence[JobRequest]) -> list[tuple[int, str, str]]:
        """Return what the state record keeps of a task's jobs: (index, name, spec key)."""
        return [(i, job_name(task_name, i), r.spec_key) for i, r in enumerate(requests)]

    def _kwargs_entry(self, task_id: str, index: int, body: bytes | None) -> dict[str, str] | None:
        """Seal a job's pickled arguments with the workflow's key; return where they are."""
        if body is None:
            return None
        sealed = seal({"kind": "kwargs", "task": task_id, "job": index}, body, self._parts.key)
        if len(sealed) <= INLINE_KWARGS_BYTES:
            return {"inline": base64.b64encode(sealed).decode()}
        return {"key": self._cache.put(sealed)}

    def store(self, spec: JobSpec) -> str:
        """Put ``spec`` in the cache (with presigned URLs on S3, and the URLs of the
        objects the backend keeps itself); return its key."""
        return self._cache.put(self._sealed(spec))

    def _sealed(self, spec: JobSpec) -> bytes:
        """``spec`` as stored: its JSON, once the URLs it needs are in it."""
        self._add_node_urls(spec)
        self._add_backend_urls(spec)
        return spec.to_json()

    def _add_backend_urls(self, spec: JobSpec) -> None:
        """Where the backend keeps the code context and payload itself (the panda
        backend: PanDA's cache, as iDDS does), the job reads them from there."""
        backend = self._parts.backend
        if backend is None:
            return
        keys = [spec.payload["key"]] + ([spec.archive["key"]] if spec.archive else [])
        urls = backend.node_urls(keys, self._cache.get)
        if urls:
            spec.urls = {**(spec.urls or {}), **urls}

    def _add_node_urls(self, spec: JobSpec) -> None:
        """On S3, give the job presigned URLs: nodes have neither credentials nor boto3."""
        cache = self._cache
        if not presigns(cache):
            return
        keys = [spec.payload["key"]]
        if spec.archive:
            keys.append(spec.archive["key"])
        if spec.environment and spec.environment.get("archive"):
            keys.append(spec.environment["archive"]["key"])
        if spec.kwargs and "key" in spec.kwargs:
            keys.append(spec.kwargs["key"])
        spec.urls = {key: node_location(cache, key) for key in keys}
        name = f"results/{spec.workflow}/{spec.task}/{spec.job}.{spec.attempt}"
        spec.result_object = name
        spec.result_put_url = cache.presigned_put(name)  # type: ignore[attr-defined]

    def request(
        self,
        task_id: str,
        index: int,
        name: str,
        spec_key: str,
        resources: Resources,
        spec_json: str | None = None,
    ) -> JobRequest:
        """Return what the backend is given to run job ``index`` of a task, named
        ``name``, from the spec ``spec_key`` (carrying its JSON ``spec_json``, when
        given, until :meth:`write` stores it)."""
        parts = self._parts
        assert parts.work_dir is not None, "the workflow has not started"
        return JobRequest(
            job_id=f"{task_id}/{index}",
            name=request_name(parts.workflow_id, task_id, name),
            spec_location=node_location(self._cache, spec_key),
            workdir=WorkflowPaths(parts.work_dir).job(task_id, index).root,
            resources=resources,
            spec_key=spec_key,
            inline_spec=None if spec_json is None else InlineSpec(spec_json),
        )

    def read(self, job: JobRequest) -> JobSpec:
        """Return the spec ``job`` runs, read back from the cache.

        Raises:
            CacheError: the spec is not in the cache.
            WrapperError: it is not a spec this version reads.
        """
        text = job.spec_json
        if text is not None and content_key(text.encode()) == job.spec_key:
            return JobSpec.from_json(text)  # it may not be stored yet
        return JobSpec.from_json(self._cache.get(job.spec_key))

    def again(self, job: JobRequest, attempt: int) -> JobRequest:
        """Store ``job``'s spec as ``attempt`` and return the request that runs it
        (in a work dir of its own, next to the first one's)."""
        assert self._parts.work_dir is not None, "the workflow has not started"
        task_id, _, index = job.job_id.partition("/")
        spec = dataclasses.replace(self.read(job), attempt=attempt)
        key = self.store(spec)
        return JobRequest(
            job_id=job.job_id,
            name=f"{job.name}#{attempt}",
            spec_location=node_location(self._cache, key),
            workdir=WorkflowPaths(self._parts.work_dir).job(task_id, int(index), attempt).root,
            resources=job.resources,
            spec_key=key,
        )

    def job_kwargs(self, spec: JobSpec) -> dict[str, Any] | None:
        """Return the keyword arguments a spec's job is called with (None: none of its own).

        Raises:
            IntegrityError: they are not signed with this workflow's key.
        """
        entry = spec.kwargs
        if not entry:
            return None
        if "inline" in entry:
            raw = base64.b64decode(entry["inline"])
        else:
            raw = self._cache.get(entry["key"])
        return loads(open_envelope(raw, self._parts.key)[1])


#: How many tasks' templates (or first jobs) a JobSpecs keeps.
_TEMPLATES_KEPT = 8
# Stand-ins for a job's own values in a task's spec, found again in its JSON. The
# NULs make them text no task name or environment holds in practice; a spec that
# holds one anyway is built the slow way (_make_template counts them).
_MARKS = ("\0idds-fat:job\0", "\0idds-fat:name\0", "\0idds-fat:kwargs\0")
_MARKS_JSON = tuple(json.dumps(mark) for mark in _MARKS)


@dataclasses.dataclass(frozen=True)
class _FirstJob:
    """The first job of a task, built the slow way: what its template is checked against."""

    source: dict[str, Any]  # the environment it was given,
    environment: dict[str, Any]  # and a copy: the template holds while they are equal
    index: int
    kwargs: dict[str, str] | None
    text: str  # its spec's JSON


class _TaskTemplate:
    """The JSON of a task's job specs with the values of their own (``job``, ``name``,
    ``kwargs``) cut out: a job's spec is then a few string joins, the same bytes as
    ``JobSpec.to_json`` (its sha256 is the spec's cache key, which the wrapper checks).
    """

    __slots__ = ("source", "environment", "pieces", "slots", "name_head")

    def __init__(
        self,
        source: dict[str, Any],
        environment: dict[str, Any],
        pieces: tuple[str, ...],
        slots: tuple[int, ...],
        name_head: str,
    ) -> None:
        self.source = source  # the environment its task's jobs are given
        self.environment = environment  # a copy, as it was when the template was made
        self.pieces = pieces  # the JSON around the three values, in the order of the text
        self.slots = slots  # which value (the index in _MARKS) goes between them
        self.name_head = name_head  # the task name as JSON, its closing quote left off

    def render(self, index: int, kwargs: dict[str, str] | None) -> str:
        """Return the spec JSON of job ``index`` with its arguments at ``kwargs`` (as
        ``_kwargs_entry`` gives)."""
        # JSON as json.dumps writes it: a job index is digits; "[", "]" and digits
        # need no escape, so a name's JSON is the task name's with "[index]" added;
        # base64 and hex need none either.
        if kwargs is None:
            where = "null"
        else:
            ((kind, value),) = kwargs.items()
            where = f'{{"{kind}": "{value}"}}'
        values = (str(index), f'{self.name_head}[{index}]"', where)
        p, (a, b, c) = self.pieces, self.slots
        return p[0] + values[a] + p[1] + values[b] + p[2] + values[c] + p[3]
