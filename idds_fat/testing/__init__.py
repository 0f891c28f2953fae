"""Helpers for testing code that uses idds-fat against real services.

:class:`ActiveMQBroker` starts a private ActiveMQ broker with a STOMP connector on
loopback (Debian ``activemq`` package required; see :meth:`ActiveMQBroker.available`).
"""

from idds_fat.testing.activemq import ActiveMQBroker, BrokerError

__all__ = ["ActiveMQBroker", "BrokerError"]
