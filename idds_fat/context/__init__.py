"""The code context: the user's ``source_dir`` packed as a deterministic zip."""

from idds_fat.context.archive import (
    DEFAULT_EXCLUDES,
    ContextArchive,
    build_context_archive,
    iter_context_files,
)

__all__ = ["DEFAULT_EXCLUDES", "ContextArchive", "build_context_archive", "iter_context_files"]
