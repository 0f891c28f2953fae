"""The code context archive: deterministic, selective, safe to extract on the node."""

from __future__ import annotations

import io
import logging
import os
import stat
import zipfile
from pathlib import Path

import pytest

from idds_fat.context import (
    DEFAULT_EXCLUDES,
    ContextArchive,
    build_context_archive,
    iter_context_files,
)
from idds_fat.errors import ContextError, ContextTooLargeError
from idds_fat.node.extract import safe_extract

TREE = {
    "main.py": "print('hello')\n",
    "pkg/__init__.py": "",
    "pkg/model.py": "def f(x):\n    return x + 1\n",
    "pkg/data/table.csv": "a,b\n1,2\n",
    "run.sh": "#!/bin/sh\necho hi\n",
    "a-b.txt": "sorts before a/ when paths are compared\n",
    "a/c.txt": "c\n",
}


def make_tree(root: Path, files: dict[str, str], reverse: bool = False) -> Path:
    names = sorted(files, reverse=reverse)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[name])
    return root


def names(archive: ContextArchive) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(archive.data)).namelist()


def rels(source: Path, **kwargs) -> list[str]:
    return [rel for rel, _ in iter_context_files(source, **kwargs)]


def test_same_tree_gives_same_sha256_regardless_of_mtime_location_and_order(tmp_path):
    one = make_tree(tmp_path / "one" / "proj", TREE)
    two = make_tree(tmp_path / "elsewhere" / "deeper" / "proj", TREE, reverse=True)
    for path in one.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    for path in two.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_123))

    first, second = build_context_archive(one), build_context_archive(two)

    assert first.sha256 == second.sha256
    assert first.data == second.data
    assert first.files == len(TREE)
    assert first.content_bytes == sum(len(text.encode()) for text in TREE.values())


def test_same_tree_gives_same_sha256_regardless_of_umask(tmp_path):
    one = make_tree(tmp_path / "one", TREE)
    two = make_tree(tmp_path / "two", TREE)
    for path in one.rglob("*"):
        if path.is_file():
            path.chmod(0o600)
    for path in two.rglob("*"):
        if path.is_file():
            path.chmod(0o664)
    (one / "run.sh").chmod(0o700)
    (two / "run.sh").chmod(0o775)

    assert build_context_archive(one).sha256 == build_context_archive(two).sha256


def test_one_changed_byte_gives_a_different_sha256(tmp_path):
    source = make_tree(tmp_path / "proj", TREE)
    before = build_context_archive(source).sha256
    (source / "pkg" / "model.py").write_text("def f(x):\n    return x + 2\n")

    assert build_context_archive(source).sha256 != before


def test_archive_has_sorted_normalised_entries_without_directories(tmp_path):
    source = make_tree(tmp_path / "proj", TREE)
    (source / "empty_dir").mkdir()
    (source / "run.sh").chmod(0o744)

    infos = zipfile.ZipFile(io.BytesIO(build_context_archive(source).data)).infolist()

    assert [i.filename for i in infos] == sorted(TREE)
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.create_system == 3
        mode = info.external_attr >> 16
        assert stat.S_ISREG(mode)
        assert stat.S_IMODE(mode) == (0o755 if info.filename == "run.sh" else 0o644)


def test_archive_round_trips_through_the_wrapper_extractor_keeping_the_executable_bit(tmp_path):
    source = make_tree(tmp_path / "proj", TREE)
    (source / "run.sh").chmod(0o755)
    archive = build_context_archive(source)
    dest = tmp_path / "extracted"
    dest.mkdir()

    written = safe_extract(archive.data, dest, 10 * 1024 * 1024)

    assert written == archive.content_bytes
    extracted = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert extracted == sorted(TREE)
    for name in TREE:
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    assert os.access(dest / "run.sh", os.X_OK)
    assert not os.access(dest / "main.py", os.X_OK)


def test_vcs_caches_and_virtualenvs_are_excluded_by_default(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {
            "main.py": "",
            ".git/HEAD": "ref: refs/heads/main\n",
            "__pycache__/main.cpython-311.pyc": "x",
            "pkg/__pycache__/m.cpython-311.pyc": "x",
            "pkg/stray.pyc": "x",
            ".venv/lib/site.py": "",
            "venv/bin/python": "",
            "proj.egg-info/PKG-INFO": "",
            ".ipynb_checkpoints/nb.ipynb": "",
            ".pytest_cache/v": "",
            ".DS_Store": "",
        },
    )

    assert rels(source) == ["main.py"]
    assert "__pycache__/" in DEFAULT_EXCLUDES and ".git/" in DEFAULT_EXCLUDES


def test_excluded_directories_are_not_entered(tmp_path, monkeypatch):
    source = make_tree(tmp_path / "proj", {"main.py": "", ".venv/lib/x.py": ""})
    listed: list[str] = []
    real_scandir = os.scandir

    def spying_scandir(path):
        listed.append(Path(path).name)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spying_scandir)
    rels(source)

    assert ".venv" not in listed and "lib" not in listed


def test_root_gitignore_is_honoured(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {
            ".gitignore": "*.log\nbuild/\n/secret.txt\n",
            "main.py": "",
            "debug.log": "",
            "pkg/deep.log": "",
            "build/out.bin": "",
            "secret.txt": "",
            "pkg/secret.txt": "",
        },
    )

    assert rels(source) == [".gitignore", "main.py", "pkg/secret.txt"]


def test_use_gitignore_false_ignores_gitignore_but_keeps_defaults(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {".gitignore": "*.log\n", "debug.log": "", ".git/HEAD": "", "pkg/.gitignore": "*"},
    )

    assert rels(source, use_gitignore=False) == [".gitignore", "debug.log", "pkg/.gitignore"]


def test_nested_gitignore_applies_relative_to_its_directory(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {
            ".gitignore": "*.tmp\n",
            "top.tmp": "",
            "keep.txt": "",
            "sub/.gitignore": "/local.txt\n!wanted.tmp\n",
            "sub/local.txt": "",
            "sub/wanted.tmp": "",
            "sub/other.tmp": "",
            "sub/inner/local.txt": "",
            "other/local.txt": "",
        },
    )

    assert rels(source) == [
        ".gitignore",
        "keep.txt",
        "other/local.txt",
        "sub/.gitignore",
        "sub/inner/local.txt",
        "sub/wanted.tmp",
    ]


def test_explicit_excludes_support_directory_patterns_and_negation(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {
            "main.py": "",
            "data/raw/big.bin": "",
            "data/small.csv": "",
            "logs/a.log": "",
            "logs/keep.log": "",
            "notes/data/x.txt": "",
        },
    )

    result = rels(source, exclude=["/data/", "*.log", "!keep.log"])

    assert result == ["logs/keep.log", "main.py", "notes/data/x.txt"]


def test_explicit_negation_overrides_gitignore_but_not_defaults(tmp_path):
    source = make_tree(
        tmp_path / "proj",
        {".gitignore": "*.csv\n", "a.csv": "", "b.csv": "", "x.pyc": ""},
    )

    assert rels(source, exclude=["!a.csv", "!x.pyc"]) == [".gitignore", "a.csv"]


def test_excluding_a_directory_hides_files_a_negation_names_inside_it(tmp_path):
    source = make_tree(tmp_path / "proj", {"data/keep.csv": "", "data/drop.csv": ""})

    assert rels(source, exclude=["data/", "!data/keep.csv"]) == []
    assert rels(source, exclude=["data/*", "!data/keep.csv"]) == ["data/keep.csv"]


def test_link_outside_the_tree_is_skipped_and_link_inside_is_stored_as_a_file(tmp_path, caplog):
    outside = make_tree(tmp_path / "outside", {"secret.txt": "do not ship", "d/x.txt": "x"})
    source = make_tree(tmp_path / "proj", {"real.txt": "real content", "lib/mod.py": "X = 1\n"})
    (source / "to_secret.txt").symlink_to(outside / "secret.txt")
    (source / "to_outside_dir").symlink_to(outside / "d")
    (source / "dangling").symlink_to(source / "missing")
    (source / "alias.txt").symlink_to("real.txt")
    (source / "lib_alias").symlink_to("lib")

    with caplog.at_level(logging.WARNING, logger="idds_fat.context.archive"):
        archive = build_context_archive(source)

    assert names(archive) == ["alias.txt", "lib/mod.py", "lib_alias/mod.py", "real.txt"]
    infos = zipfile.ZipFile(io.BytesIO(archive.data)).infolist()
    assert all(stat.S_ISREG(info.external_attr >> 16) for info in infos)
    assert zipfile.ZipFile(io.BytesIO(archive.data)).read("alias.txt") == b"real content"
    warned = caplog.text
    assert "to_secret.txt" in warned and "to_outside_dir" in warned and "dangling" in warned


def test_directory_link_that_would_loop_is_skipped(tmp_path):
    source = make_tree(tmp_path / "proj", {"a/x.txt": "x", "b/y.txt": "y"})
    (source / "a" / "to_root").symlink_to(source)
    (source / "a" / "to_b").symlink_to(source / "b")
    (source / "b" / "to_a").symlink_to(source / "a")

    result = rels(source)

    assert result == ["a/to_b/y.txt", "a/x.txt", "b/to_a/x.txt", "b/y.txt"]


def test_fifo_is_skipped(tmp_path):
    source = make_tree(tmp_path / "proj", {"main.py": ""})
    os.mkfifo(source / "pipe")

    assert names(build_context_archive(source)) == ["main.py"]


def test_size_cap_error_names_the_largest_file_and_directory(tmp_path):
    source = make_tree(tmp_path / "proj", {"main.py": "x = 1\n", "models/small.txt": "s"})
    (source / "data" / "raw").mkdir(parents=True)
    (source / "data" / "raw" / "huge.bin").write_bytes(b"\0" * 300_000)
    (source / "data" / "other.bin").write_bytes(b"\0" * 5_000)

    with pytest.raises(ContextTooLargeError) as caught:
        build_context_archive(source, max_bytes=100_000)

    message = str(caught.value)
    assert "data/raw/huge.bin" in message
    assert "data/" in message and "data/raw/" in message
    assert "297.9 KiB" in message  # the total, human-readable
    assert "97.7 KiB" in message  # the cap
    assert "exclude_source_files=" in message and ".gitignore" in message
    assert isinstance(caught.value, ContextError)


def test_tree_within_the_cap_is_packed(tmp_path):
    source = make_tree(tmp_path / "proj", {"main.py": "x" * 100})

    assert build_context_archive(source, max_bytes=100).files == 1


def test_missing_source_dir_raises_context_error_naming_it(tmp_path):
    missing = tmp_path / "nope"

    with pytest.raises(ContextError, match="nope"):
        build_context_archive(missing)
    with pytest.raises(ContextError, match="nope"):
        iter_context_files(missing)


def test_source_dir_that_is_a_file_raises_context_error(tmp_path):
    path = tmp_path / "file.py"
    path.write_text("")

    with pytest.raises(ContextError, match="not a directory"):
        build_context_archive(path)


def test_iter_context_files_yields_sorted_relative_and_absolute_paths(tmp_path):
    source = make_tree(tmp_path / "proj", TREE)

    pairs = list(iter_context_files(source))

    assert [rel for rel, _ in pairs] == sorted(TREE)
    for rel, path in pairs:
        assert path.is_absolute()
        assert path == source.resolve() / rel
