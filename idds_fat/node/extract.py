"""Safe extraction of what a job unpacks: its code context (zip) and environment tarballs.

Nothing lands outside the target directory, whatever the archive's names,
links or sizes claim; a refusal raises UnsafeArchiveError.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from .errors import UnsafeArchiveError


def safe_extract(data: bytes, dest: Path, max_bytes: int, max_files: int = 200_000) -> int:
    """Extract zip ``data`` into directory ``dest``; return the bytes written.

    Refuses absolute names, ``..`` components, links and device entries, more
    than ``max_files`` entries, and more than ``max_bytes`` of content (counted
    while decompressing, so a lying header does not help a zip bomb).

    Raises UnsafeArchiveError, leaving only what was written before the refusal.
    """
    import zipfile  # only jobs with a code context need it

    dest = Path(dest).resolve()
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


def safe_untar(data: bytes, dest: Path) -> None:
    """Extract tar ``data`` (any compression) into ``dest``.

    Refuses absolute names, ``..`` components, device files and any member that
    would land outside ``dest`` (also through a symlink extracted before it).
    Symlinks themselves may point anywhere: a venv-pack tarball's ``bin/python``
    names the interpreter by absolute path. Raises UnsafeArchiveError.
    """
    import tarfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
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
                return
            root = dest.resolve()
            for member in members:
                target = (root / member.name).resolve()
                if target != root and root not in target.parents:
                    raise UnsafeArchiveError(f"tar member {member.name!r} lands outside the tree")
                tar.extract(member, dest)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"environment archive refused: {exc}") from None
