"""The node side of idds-fat: the wrapper that runs jobs, on any node, with the stdlib alone.

Data flow of one job (names are this package's modules)::

    backend: python3 wrapper.py --spec LOCATION        (secrets: a pipe, IDDS_FAT_JOB_SECRETS_FD,
       |                                                  or a 0600 file, ..._FILE)
       |
       v
    main --> spec.read_secrets
       |     fetch.load_spec: LOCATION -> JobSpec, checked against the sha256 in its name
       v
    environments: init_env, then current | venv | conda | container
       |          (built once per node; the wrapper runs again inside, same arguments)
       v
    run:  fetch archive, payload, kwargs <------------------ cache (directory / HTTP / S3)
       |  (each checked against its sha256)                    ^
       |  extract: archive -> fresh dir (no traversal, links, bombs)
       |  envelope.unseal: call (HMAC) -> cloudpickle -> fn(*args, **kwargs)
       |  envelope.seal: value, or exception + traceback -> result envelope
       v                                                       |
    deliver: reply file / worker pipe, else STOMP, then REST;  |
       |     a large result goes to the cache -----------------'
       |     and a signed reference to it travels instead
       v
    exit status (errors): 0 delivered, 2 could not start, 3 not delivered

A warm worker (``--worker``, jobs on stdin) and a pack (``--jobs-file F --pack
N``) loop over run and deliver in one interpreter (worker), keeping verified
objects and the extracted code context between jobs.

The modules import only the standard library and each other; cloudpickle (and
stomp.py, for a broker) only inside the functions that run or deliver a job.
A cold job pays for every import, so what a plain job does not need (zipfile,
subprocess, tempfile, shutil, the HTTP stack) is imported where it is used
(docs/performance.md, "Cold job").

The SDK imports these modules like any other: the envelope format, the job
spec and the errors are defined here, once. A node gets one file built from
them (``idds_fat.wrapper_source``), which needs nothing of the SDK.
"""
