"""A content store in a local or shared directory: ``ROOT/ab/abcd…``."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from idds_fat.cache.base import ContentStore, check_key, content_key, verify
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
        # Plain string paths, and the fan-out directory made only when missing: a job
        # spec is written on the caller's path, where each extra system call shows.
        directory = os.path.join(self.root, key[:2])
        target = os.path.join(directory, key)
        try:
            fd, tmp = self._temporary(directory, key)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise CacheError(f"cannot write {target}: {exc}") from exc
        logger.debug("stored %s (%d bytes) in %s", key, len(data), self.root)

    @staticmethod
    def _temporary(directory: str, key: str) -> tuple[int, str]:
        """Create a temporary file for ``key`` in its fan-out ``directory`` (made, 0700,
        if missing), 0600; return its descriptor and path. Its name is unique among the
        threads and processes writing at once; ``mkstemp`` picks one only when a killed
        writer whose pid came back left that name."""
        tmp = os.path.join(directory, f".{key[:8]}-{os.getpid()}-{threading.get_ident()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            pass
        except FileNotFoundError:
            private_dir(Path(directory))
            with contextlib.suppress(FileExistsError):
                return os.open(tmp, flags, 0o600), tmp
        return tempfile.mkstemp(prefix=f".{key[:8]}-", suffix=".tmp", dir=directory)

    def put_many(self, items: Iterable[bytes]) -> list[str]:
        """Store each of ``items``; return their keys.

        For a batch of new objects (job specs): no check that an object is there
        already, which costs more than writing it again (an identical copy then
        replaces it, atomically).

        Raises CacheError when an object cannot be written (those before it stay).
        """
        keys = []
        for data in items:
            key = content_key(data)
            self._write(key, data)
            keys.append(key)
        return keys

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
