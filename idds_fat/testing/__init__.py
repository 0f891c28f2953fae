"""Helpers for testing code that uses idds-fat against real services.

:class:`ActiveMQBroker` starts a private ActiveMQ broker with a STOMP connector on
loopback (Debian ``activemq`` package required; see :meth:`ActiveMQBroker.available`).

:class:`SlurmCluster` starts a private single-node Slurm cluster reached through
``SLURM_CONF`` (Debian ``slurm-wlm`` and ``munge`` packages and root required; see
:meth:`SlurmCluster.available`).

:class:`PandaServer` starts a private PanDA server with JEDI on a private PostgreSQL
(``.ci/install-services`` installs it; see :meth:`PandaServer.available`), and
:class:`PandaPilot` runs its jobs as a stand-in for the pilot.

:class:`S3Server` starts moto's S3 server on loopback. :func:`wait_until` polls a
condition against a deadline.
"""

from idds_fat.testing.activemq import ActiveMQBroker, BrokerError
from idds_fat.testing.panda import PandaServer, PandaServerError
from idds_fat.testing.panda_pilot import PandaPilot, PandaPilotError, PilotJob
from idds_fat.testing.s3 import S3Server, S3ServerError
from idds_fat.testing.slurm import SlurmCluster, SlurmClusterError
from idds_fat.testing.waiting import wait_until

__all__ = [
    "ActiveMQBroker",
    "BrokerError",
    "PandaPilot",
    "PandaPilotError",
    "PandaServer",
    "PandaServerError",
    "PilotJob",
    "S3Server",
    "S3ServerError",
    "SlurmCluster",
    "SlurmClusterError",
    "wait_until",
]
