"""The public surface: ``work`` and ``workflow``."""

from idds_fat.api.decorators import WorkFunction, work, workflow

__all__ = ["WorkFunction", "work", "workflow"]
