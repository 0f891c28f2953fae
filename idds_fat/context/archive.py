"""The code context of a task: a deterministic zip of the user's ``source_dir``.

The archive travels to every job through the content cache, addressed by its
sha256, so it must be a pure function of the tree's contents: the same files
give the same bytes, whatever their mtimes, the order the file system lists
them in, the umask they were created under, or where the tree lives on disk.
An unchanged tree is then never uploaded twice.

Which files go in follows ``.gitignore`` syntax (via :mod:`pathspec`), as Ray's
``runtime_env`` ``working_dir`` does, and the archive has a size cap whose
error names the largest files and directories.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import sys
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pathspec import GitIgnoreSpec

from idds_fat.cache.base import check_key
from idds_fat.errors import ContextError, ContextTooLargeError
from idds_fat.workdir import private_dir, write_private

logger = logging.getLogger(__name__)

DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/",
    "__pycache__/",
    "*.py[co]",
    ".ipynb_checkpoints/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".venv/",
    "venv/",
    "*.egg-info/",
    ".tox/",
    ".DS_Store",
)
"""Patterns (``.gitignore`` syntax) never packed, whatever else is asked."""

# Every field of an entry that zipfile would otherwise take from the file system
# or the platform is fixed, so the bytes depend on contents and names only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CREATE_SYSTEM_UNIX = 3
_COMPRESSLEVEL = 6
_TOP_OFFENDERS = 5

_DEFAULT_SPEC = GitIgnoreSpec.from_lines(DEFAULT_EXCLUDES)


@dataclass(frozen=True)
class ContextArchive:
    """A packed code context.

    ``data`` is the zip, ``sha256`` its hex digest (its key in the content
    cache), ``files`` the number of files in it, ``content_bytes`` their total
    uncompressed size, and ``source_dir`` the resolved directory it was built
    from (information only: it does not affect ``data``). ``data`` is ``None``
    when an index said the same tree was packed before (``build_context_archive``
    with ``index_dir``): its zip is then known only by ``sha256``.
    """

    data: bytes | None = field(repr=False)
    sha256: str
    files: int
    content_bytes: int
    source_dir: Path


@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path inside the archive
    path: Path  # where the file appears in the tree (may go through a link)
    read_from: Path  # what is opened: the link's resolved target for a file link
    size: int
    executable: bool
    stamp: str  # size, mtime, ctime and inode: what the context index compares

    @classmethod
    def of(cls, rel: str, path: Path, read_from: Path, st: os.stat_result) -> _Entry:
        """The entry of a file whose ``stat`` (of ``read_from``) the walk already made."""
        stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        return cls(rel, path, read_from, st.st_size, bool(st.st_mode & 0o111), stamp)


class _Rules:
    """The exclude rules in force in one directory of the walk."""

    def __init__(
        self,
        explicit: GitIgnoreSpec | None,
        gitignores: tuple[tuple[str, GitIgnoreSpec], ...] = (),
    ) -> None:
        self.explicit = explicit
        # (prefix of the directory holding the .gitignore, its patterns), root first
        self.gitignores = gitignores

    def with_gitignore(self, prefix: str, spec: GitIgnoreSpec) -> _Rules:
        return _Rules(self.explicit, (*self.gitignores, (prefix, spec)))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        probe = rel + "/" if is_dir else rel
        if _DEFAULT_SPEC.match_file(probe):
            return True
        # As in git, the most specific source that has an opinion decides: the
        # caller's patterns first, then the deepest .gitignore; within one source
        # the last matching pattern wins (pathspec handles that part).
        if self.explicit is not None:
            verdict = self.explicit.check_file(probe).include
            if verdict is not None:
                return verdict
        for prefix, spec in reversed(self.gitignores):
            verdict = spec.check_file(probe[len(prefix) :]).include
            if verdict is not None:
                return verdict
        return False


def _read_gitignore(path: Path) -> GitIgnoreSpec | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        logger.warning("cannot read %s, its patterns are not applied: %s", path, exc)
        return None
    return GitIgnoreSpec.from_lines(text.splitlines())


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk(
    tree_dir: Path,
    real_dir: Path,
    prefix: str,
    rules: _Rules,
    use_gitignore: bool,
    root: Path,
    ancestors: frozenset[Path],
    out: list[_Entry],
) -> None:
    """Append the included files under ``tree_dir`` to ``out``.

    ``real_dir`` is the resolved ``tree_dir``; ``ancestors`` the resolved
    directories on the walk's stack, which a directory link must not re-enter.
    """
    if use_gitignore:
        gitignore = real_dir / ".gitignore"
        if gitignore.is_file():
            spec = _read_gitignore(gitignore)
            if spec is not None:
                rules = rules.with_gitignore(prefix, spec)
    try:
        with os.scandir(tree_dir) as listing:
            entries = list(listing)
    except OSError as exc:
        raise ContextError(
            f"cannot list {tree_dir} in the code context: {exc}; "
            f"exclude it with exclude_source_files=[{prefix!r}] or a .gitignore entry"
        ) from exc
    for entry in entries:
        rel = prefix + entry.name
        path = tree_dir / entry.name
        if entry.is_symlink():
            _walk_link(path, rel, rules, use_gitignore, root, ancestors, out)
        elif entry.is_dir(follow_symlinks=False):
            if not rules.excluded(rel, is_dir=True):
                real = real_dir / entry.name
                _walk(path, real, rel + "/", rules, use_gitignore, root, ancestors | {real}, out)
        elif entry.is_file(follow_symlinks=False):
            if not rules.excluded(rel, is_dir=False):
                st = entry.stat(follow_symlinks=False)
                out.append(_Entry.of(rel, path, path, st))
        else:
            logger.debug("skipping %s: not a regular file or directory", path)


def _walk_link(
    path: Path,
    rel: str,
    rules: _Rules,
    use_gitignore: bool,
    root: Path,
    ancestors: frozenset[Path],
    out: list[_Entry],
) -> None:
    """Pack what the link at ``path`` points to, if that is inside the tree."""
    target = Path(os.path.realpath(path))
    is_dir = target.is_dir()
    if rules.excluded(rel, is_dir=is_dir):
        return
    if not target.exists():
        logger.warning("skipping %s in the code context: dangling link", path)
        return
    if not _inside(target, root):
        logger.warning(
            "skipping %s in the code context: it links to %s, outside %s", path, target, root
        )
        return
    if is_dir:
        if target in ancestors:
            logger.warning(
                "skipping %s in the code context: it links to %s, which contains it", path, target
            )
            return
        _walk(path, target, rel + "/", rules, use_gitignore, root, ancestors | {target}, out)
    elif target.is_file():
        st = target.stat()
        out.append(_Entry.of(rel, path, target, st))
    else:
        logger.debug("skipping %s: it links to %s, not a regular file", path, target)


def _resolve_root(source_dir: str | os.PathLike[str]) -> Path:
    path = Path(source_dir).expanduser()
    if not path.exists():
        raise ContextError(f"source_dir {str(path)!r} does not exist")
    if not path.is_dir():
        raise ContextError(f"source_dir {str(path)!r} is not a directory")
    return path.resolve()


def _collect(
    source_dir: str | os.PathLike[str], exclude: Sequence[str], use_gitignore: bool
) -> tuple[Path, list[_Entry]]:
    root = _resolve_root(source_dir)
    # A lone string would otherwise be read as one pattern per character.
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    explicit = GitIgnoreSpec.from_lines(patterns) if patterns else None
    out: list[_Entry] = []
    _walk(root, root, "", _Rules(explicit), use_gitignore, root, frozenset({root}), out)
    # A global sort, not a sorted walk: "a-b" sorts before "a/c" but the walk
    # would visit directory "a" first.
    out.sort(key=lambda e: e.rel)
    return root, out


def iter_context_files(
    source_dir: str | os.PathLike[str],
    exclude: Sequence[str] = (),
    use_gitignore: bool = True,
) -> Iterator[tuple[str, Path]]:
    """Return the files that :func:`build_context_archive` would pack, in archive order.

    Yields ``(relative POSIX path, absolute path)`` pairs sorted by the relative
    path. The absolute path is where the file appears in the (resolved) tree; for
    a file reached through a link inside the tree it goes through that link. The
    selection rules are those of :func:`build_context_archive`. The tree is walked
    before this returns, so errors are raised here, not while iterating.

    Raises:
        ContextError: ``source_dir`` is missing, not a directory, or holds a
            directory that cannot be listed.
    """
    _, entries = _collect(source_dir, exclude, use_gitignore)
    return iter([(e.rel, e.path) for e in entries])


def _fingerprint(entries: list[_Entry]) -> str:
    """Hash what decides the zip's bytes, each file's content standing in by its stat.

    Size and mtime are what ``make`` and ``rsync`` trust; the inode change time
    is added because no user can set it back, so a rewrite that restores the
    mtime (``touch -d``, ``cp -p``) still counts as a change.
    """
    version = f"v1 {sys.version_info[0]}.{sys.version_info[1]} {zlib.ZLIB_RUNTIME_VERSION}\n"
    digest = hashlib.sha256(version.encode())
    for entry in entries:
        digest.update(f"{entry.rel}\0{entry.stamp}\0{entry.executable}\n".encode())
    return digest.hexdigest()


def build_context_archive(
    source_dir: str | os.PathLike[str],
    exclude: Sequence[str] = (),
    max_bytes: int = 100 * 1024 * 1024,
    use_gitignore: bool = True,
    index_dir: Path | None = None,
) -> ContextArchive:
    """Pack ``source_dir`` into a deterministic zip and return it with its sha256.

    The same tree gives the same bytes (with the same zlib), whatever the files'
    mtimes, listing order, umask or the tree's absolute location: entries are
    sorted by relative POSIX path, dated 1980-01-01 00:00:00, marked as made on
    Unix, with permissions normalised to 0o755 (any executable bit set) or 0o644,
    and deflated at a fixed level. Only regular files are stored; directories are
    implied by the files' paths, so empty directories are dropped.

    Selection, in ``.gitignore`` syntax relative to ``source_dir``:

    * :data:`DEFAULT_EXCLUDES` always apply and cannot be negated;
    * ``exclude`` patterns come next and win over any ``.gitignore``;
    * with ``use_gitignore``, every ``.gitignore`` in the tree applies to its own
      directory and below (a deeper file wins over a shallower one); those above
      ``source_dir`` and ``.git/info/exclude`` are not read.

    As in git, an excluded directory is not entered, so a negation cannot bring
    back a file inside it (write ``data/*`` and ``!data/keep.csv``, not
    ``data/``). A link to a file or directory inside the tree is stored as what
    it points to (a directory link that would loop is skipped); a link leading
    outside the tree or nowhere is skipped with a warning. Sockets, FIFOs and
    devices are skipped.

    With ``index_dir``, a tree whose selected files all have the same paths,
    sizes, modification and inode change times and inodes as one packed before
    is not packed again: the archive returned has ``data=None``
    and the earlier ``sha256``. The index is a file per tree state in
    ``index_dir``; a tree packed anew is added to it.

    Raises:
        ContextError: ``source_dir`` is missing or not a directory, or a file or
            directory in it cannot be read.
        ContextTooLargeError: the included files add up to more than
            ``max_bytes`` (checked before anything is compressed); the message
            names the five largest files and directories.
    """
    root, entries = _collect(source_dir, exclude, use_gitignore)
    total = sum(e.size for e in entries)
    if total > max_bytes:
        raise ContextTooLargeError(_too_large_message(root, entries, total, max_bytes))
    indexed = None if index_dir is None else Path(index_dir) / f"{_fingerprint(entries)}.json"
    if indexed is not None:
        known = _read_index(indexed)
        if known is not None:
            logger.info("code context %s unchanged since it was packed as %s", root, known[0])
            return ContextArchive(
                data=None,
                sha256=known[0],
                files=len(entries),
                content_bytes=known[1],
                source_dir=root,
            )

    buffer = io.BytesIO()
    content_bytes = 0
    with zipfile.ZipFile(buffer, "w") as archive:
        for entry in entries:
            try:
                data = entry.read_from.read_bytes()
            except OSError as exc:
                raise ContextError(
                    f"cannot read {entry.path} in the code context: {exc}; exclude it with "
                    f"exclude_source_files=[{entry.rel!r}] or a .gitignore entry"
                ) from exc
            content_bytes += len(data)
            # A file that grew after the walk must not slip past the cap.
            if content_bytes > max_bytes:
                raise ContextTooLargeError(
                    _too_large_message(root, entries, content_bytes, max_bytes)
                )
            info = zipfile.ZipInfo(entry.rel, date_time=_ZIP_EPOCH)
            info.create_system = _CREATE_SYSTEM_UNIX
            mode = 0o755 if entry.executable else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(
                info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=_COMPRESSLEVEL
            )
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    logger.info(
        "packed %s: %d files, %s, zip of %s, sha256 %s",
        root,
        len(entries),
        _human(content_bytes),
        _human(len(data)),
        digest,
    )
    if indexed is not None:
        _write_index(indexed, digest, content_bytes)
    return ContextArchive(
        data=data, sha256=digest, files=len(entries), content_bytes=content_bytes, source_dir=root
    )


def _read_index(path: Path) -> tuple[str, int] | None:
    try:
        known = json.loads(path.read_text())
        return check_key(known["sha256"]), int(known["content_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: pack the tree


def _write_index(path: Path, sha256: str, content_bytes: int) -> None:
    # Best effort: without an index entry the next workflow packs the tree again.
    try:
        private_dir(path.parent)  # it names the user's trees: theirs alone, as the work dir
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_private(tmp, json.dumps({"sha256": sha256, "content_bytes": content_bytes}).encode())
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not record the packed code context in %s: %s", path, exc)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _too_large_message(root: Path, entries: list[_Entry], total: int, max_bytes: int) -> str:
    # A directory counts everything below it, so "data/" and "data/raw/" may both
    # appear: the pair says where inside "data/" the weight is.
    dirs: dict[str, int] = {}
    for entry in entries:
        parts = entry.rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            name = "/".join(parts[:depth]) + "/"
            dirs[name] = dirs.get(name, 0) + entry.size
    files = sorted(entries, key=lambda e: (-e.size, e.rel))[:_TOP_OFFENDERS]
    big_dirs = sorted(dirs.items(), key=lambda item: (-item[1], item[0]))[:_TOP_OFFENDERS]
    lines = [
        f"the code context {root} holds {_human(total)} in {len(entries)} files, more than "
        f"its cap of {_human(max_bytes)} ({max_bytes} bytes)",
        "largest files:",
        *(f"    {_human(e.size):>10}  {e.rel}" for e in files),
    ]
    if big_dirs:
        lines.append("largest directories:")
        lines.extend(f"    {_human(size):>10}  {name}" for name, size in big_dirs)
    example = big_dirs[0][0] if big_dirs else files[0].rel if files else "data/"
    lines.append(
        f"leave out what the jobs do not need with exclude_source_files=[{example!r}] "
        f"or a line {example!r} in {root / '.gitignore'}"
    )
    return "\n".join(lines)
