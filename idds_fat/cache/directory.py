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

    def put_many(self, items: Iterable[bytes]) -> list[str]:
        """Store each of ``items``; return their keys.

        The same files as ``put`` (each written to a temporary file of its own and
        renamed into place, 0600), with less per object, for a batch of new objects
        (job specs): no check that an object is there already (an identical copy
        then replaces it, atomically), fan-out directories made only when missing,
        plain string paths. On this machine's disk that is a third of ``put``'s
        time per job spec, on the caller's critical path.

        Raises CacheError when an object cannot be written (those before it stay).
        """
        root = str(self.root)
        # Unique among the threads and processes that may write an object at once.
        suffix = f"-{os.getpid()}-{threading.get_ident()}.tmp"
        keys = []
        for data in items:
            key = content_key(data)
            keys.append(key)
            directory = os.path.join(root, key[:2])
            target = os.path.join(directory, key)
            tmp = os.path.join(directory, f".{key[:8]}{suffix}")
            try:
                fd = self._create(directory, tmp)
                if fd is None:  # left by a killed process whose pid came back
                    self._write(key, data)
                    continue
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
        return keys

    @staticmethod
    def _create(directory: str, tmp: str) -> int | None:
        """Create ``tmp`` (0600 whatever the umask, as mkstemp) and return its descriptor,
        making its fan-out ``directory`` first if missing; None if ``tmp`` exists."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:
            return None
        except FileNotFoundError:
            private_dir(Path(directory))
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:
            return None

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
