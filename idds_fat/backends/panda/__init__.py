"""The ``panda`` backend: each task becomes one PanDA (JEDI) task, each job one of its inputs.

:mod:`.backend` holds :class:`PandaBackend`; :mod:`.client` the ``/api/v1`` HTTP
calls; :mod:`.auth` the credentials; :mod:`.bootstrap` the script jobs start
with on the node; :mod:`.errors` the errors.
"""

from idds_fat.backends.panda.auth import PandaAuth
from idds_fat.backends.panda.backend import (
    DEFAULT_TRANS_PATH,
    FINAL_TASK_STATES,
    PandaBackend,
    pseudo_input,
)
from idds_fat.backends.panda.bootstrap import BOOTSTRAP_B64, PANDA_SECRETS_FILE
from idds_fat.backends.panda.client import (
    DEFAULT_CACHE_URL,
    DEFAULT_SERVER_URL,
    OTHER_LIMIT_BYTES,
    SOURCES_LIMIT_BYTES,
    PandaClient,
    api_base,
)
from idds_fat.backends.panda.errors import (
    PandaAuthError,
    PandaError,
    PandaRejectedError,
    PandaUnavailableError,
)

__all__ = [
    "BOOTSTRAP_B64",
    "DEFAULT_CACHE_URL",
    "DEFAULT_SERVER_URL",
    "DEFAULT_TRANS_PATH",
    "FINAL_TASK_STATES",
    "OTHER_LIMIT_BYTES",
    "PANDA_SECRETS_FILE",
    "SOURCES_LIMIT_BYTES",
    "PandaAuth",
    "PandaAuthError",
    "PandaBackend",
    "PandaClient",
    "PandaError",
    "PandaRejectedError",
    "PandaUnavailableError",
    "api_base",
    "pseudo_input",
]
