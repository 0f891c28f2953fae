"""Safe extraction of what a job unpacks: its code context (zip) and environment tarballs.

Nothing lands outside the target directory, whatever the archive's names,
links or sizes claim; a refusal raises UnsafeArchiveError and removes what the
extraction had written, so a failed job leaves nothing behind (a warm worker
would otherwise keep it until it exits).
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import UnsafeArchiveError

if TYPE_CHECKING:  # loaded where an archive is extracted: a cold job without one never does
    from pathlib import Path

#: A tarball (an environment: venv-pack, conda-pack) may expand to this many times
#: its own size, or ``MIN_UNTAR_BYTES`` if more. Real ones expand 2-5 times; a
#: bomb made of zeros, a thousand.
MAX_UNTAR_RATIO = 100
MIN_UNTAR_BYTES = 64 * 1024 * 1024


@contextmanager
def _removed_on_failure(dest: Path):
    """Remove, if the block raises, every entry of ``dest`` that was not there before."""
    before = set(os.listdir(dest))
    try:
        yield
    except BaseException:
        import shutil  # only a refusal needs it: a cold job without one never loads it

        for name in set(os.listdir(dest)) - before:
            path = dest / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def safe_extract(data: bytes, dest: Path, max_bytes: int, max_files: int = 200_000) -> int:
    """Extract zip ``data`` into directory ``dest``; return the bytes written.

    Refuses absolute names, ``..`` components, links and device entries, more
    than ``max_files`` entries, and more than ``max_bytes`` of content (counted
    while decompressing, so a lying header does not help a zip bomb).

    Raises UnsafeArchiveError, having removed what it wrote (every entry of
    ``dest`` that was not there before).
    """
    from pathlib import Path

    dest = Path(dest).resolve()
    with _removed_on_failure(dest):
        return _extract_zip(data, dest, max_bytes, max_files)


def _extract_zip(data: bytes, dest: Path, max_bytes: int, max_files: int) -> int:
    import zipfile  # only jobs with a code context need it

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"not a zip archive: {exc}") from None
    entries = archive.infolist()
    if len(entries) > max_files:
        raise UnsafeArchiveError(f"archive has {len(entries)} entries, more than {max_files}")
    written = 0
    for info in entries:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"archive entry {name!r} is a link or special file")
        target = (dest / name).resolve()
        if target != dest and dest not in target.parents:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(target, "xb") as sink:
            while True:
                chunk = source.read(1 << 20)
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise UnsafeArchiveError(f"archive expands beyond {max_bytes} bytes")
                sink.write(chunk)
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
    return written


def safe_untar(
    data: bytes, dest: Path, max_bytes: int | None = None, max_files: int = 1_000_000
) -> int:
    """Extract tar ``data`` (any compression) into ``dest``; return the bytes of content.

    Refuses absolute names, ``..`` components, device files and any member that
    would land outside ``dest`` (also through a symlink extracted before it).
    Symlinks themselves may point anywhere: a venv-pack tarball's ``bin/python``
    names the interpreter by absolute path. Refuses more than ``max_files``
    members and more than ``max_bytes`` of content (default: ``MAX_UNTAR_RATIO``
    times the tarball's size, at least ``MIN_UNTAR_BYTES``), counted from the
    members' headers as they are read, before the stream past them is
    decompressed or anything is written.

    Raises UnsafeArchiveError, having removed what it wrote (every entry of
    ``dest`` that was not there before).
    """
    if max_bytes is None:
        max_bytes = max(MIN_UNTAR_BYTES, MAX_UNTAR_RATIO * len(data))
    from pathlib import Path

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _removed_on_failure(dest):
        return _extract_tar(data, dest, max_bytes, max_files)


def _extract_tar(data: bytes, dest: Path, max_bytes: int, max_files: int) -> int:
    import tarfile

    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = []
            for member in tar:  # one header at a time: a bomb is refused before it expands
                members.append(member)
                if len(members) > max_files:
                    raise UnsafeArchiveError(f"tarball has more than {max_files} members")
                if member.isfile():
                    total += member.size
                    if total > max_bytes:
                        raise UnsafeArchiveError(f"tarball expands beyond {max_bytes} bytes")
                parts = member.name.replace("\\", "/").split("/")
                if member.name.startswith("/") or ".." in parts:
                    raise UnsafeArchiveError(f"tar member {member.name!r} points outside the tree")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeArchiveError(f"tar member {member.name!r} is a special file")
                if member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname):
                    raise UnsafeArchiveError(f"tar member {member.name!r} links outside the tree")
            if hasattr(tarfile, "tar_filter"):  # Python 3.12, and 3.8.17+/3.11.4+
                # It also refuses a member that would be written through a symlink.
                tar.extractall(dest, members, filter="tar")
                return total
            root = dest.resolve()
            for member in members:
                target = (root / member.name).resolve()
                if target != root and root not in target.parents:
                    raise UnsafeArchiveError(f"tar member {member.name!r} lands outside the tree")
                tar.extract(member, dest)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"environment archive refused: {exc}") from None
    return total
