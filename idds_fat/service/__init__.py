"""The idds-fat HTTP service: content cache and result store."""

from __future__ import annotations

from idds_fat.service.app import create_app
from idds_fat.service.result_store import ResultStore
from idds_fat.service.server import EmbeddedService, serve

__all__ = ["EmbeddedService", "ResultStore", "create_app", "serve"]
