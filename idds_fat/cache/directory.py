"""A content store in a local or shared directory: ``ROOT/ab/abcd…``."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from idds_fat.cache.base import ContentStore, check_key, verify
from idds_fat.errors import CacheError
from idds_fat.workdir import private_dir

logger = logging.getLogger(__name__)


class DirectoryStore(ContentStore):
    """Objects stored as files under ``root``, fanned out by the first two hex digits.

    Writes go to a temporary file in the object's own directory and are renamed
    into place, so a reader never sees a partial object and concurrent puts of
    the same key (from threads, processes or nodes sharing the directory) are safe.
    Objects hold pickled arguments and results: files are 0600 and the
    directories it creates 0700, whatever the umask (only their user's jobs read them).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = self.root.resolve().as_uri()

    def path(self, key: str) -> Path:
        """Return the file that holds ``key`` (it need not exist).

        Raises ValueError if ``key`` is not a content key.
        """
        check_key(key)
        return self.root / key[:2] / key

    def exists(self, key: str) -> bool:
        """Return whether ``key`` is stored."""
        return self.path(key).is_file()

    def _write(self, key: str, data: bytes) -> None:
        target = self.path(key)
        try:
            private_dir(target.parent)
            # mkstemp creates the file 0600, whatever the umask.
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}-", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise CacheError(f"cannot write {target}: {exc}") from exc
        logger.debug("stored %s (%d bytes) in %s", key, len(data), self.root)

    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``, verified against it.

        Raises:
            KeyError: nothing is stored under ``key``.
            IntegrityError: the file's content does not match ``key`` (names the path).
            CacheError: the file exists but cannot be read.
        """
        target = self.path(key)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise CacheError(f"cannot read {target}: {exc}") from exc
        return verify(key, data, str(target))
